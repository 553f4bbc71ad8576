//! Users across nodes: several roomcast nodes on one PostgreSQL database (and one
//! Redis), behind nginx, built by the multi-node harness (tests/common/cluster.rs).

mod common;

use common::{
    cluster::{Cluster, NodeKind},
    Codec,
};
use roomcast::proto::v1 as pb;

/// The harness itself: in-process and process nodes share one database (an
/// account made on one node signs in on another, and its token works on every
/// node and through nginx), every node stays on its address across a restart,
/// and nginx keeps answering while one node restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_database_behind_nginx_and_restart_in_place() {
    let Some(mut cluster) = Cluster::builder(3)
        .node_kind(2, NodeKind::Process)
        .nginx()
        .start()
        .await
    else {
        return;
    };
    let alice = cluster.sign_up(0, &common::unique_name("alice")).await;
    let again = cluster.sign_in(2, &alice.username).await;
    assert_eq!(again.user_id, alice.user_id);
    for index in 0..cluster.len() {
        let me: pb::GetMeResponse = cluster
            .rpc_as(index, &alice.access_token)
            .call(Codec::Json, "UserService/GetMe", &pb::GetMeRequest {})
            .await
            .unwrap_or_else(|e| panic!("GetMe on node {index}: {e}"));
        assert_eq!(me.user.map(|u| u.id), Some(alice.user_id.clone()));
    }
    let addr = cluster.addr(2);
    cluster.restart(2).await;
    assert_eq!(cluster.addr(2), addr, "a restarted node keeps its address");
    cluster.kill(1);
    for _ in 0..6 {
        let me: Result<pb::GetMeResponse, _> = cluster
            .nginx_rpc_as(&again.access_token)
            .call(Codec::Proto, "UserService/GetMe", &pb::GetMeRequest {})
            .await;
        me.unwrap_or_else(|e| panic!("GetMe through nginx with node 1 down: {e}"));
    }
    cluster.start_node(1).await;
    let (status, body) = cluster.readyz(1).await;
    assert_eq!(status, 200, "{body}");
}
