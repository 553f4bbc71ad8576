//! AdminService.DisconnectConnection, DisconnectUser and DrainNode over real
//! sockets: what a client of the node sees, and that members and guests are refused.

mod common;

use std::time::Duration;

use common::{
    admin_call, expect_error,
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, TestServer,
};
use roomcast::{ids::UserId, model::Role, proto::v1 as pb};

/// How long a close may take to arrive.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for the server to close `ws`; answers the close code and reason.
async fn closed_with(ws: &mut WsClient) -> (u16, String) {
    loop {
        match ws.next_push(CLOSE_TIMEOUT).await {
            Incoming::Closed(code, reason) => return (code, reason),
            Incoming::Frame(_) => continue,
            Incoming::Timeout => panic!("the connection was not closed"),
        }
    }
}

/// Members and guests get permission_denied for the three RPCs, whatever they ask.
async fn refused_to_members_and_guests(server: &TestServer, victim: &Account) {
    let member = server.sign_up("mallory").await;
    let guest = server.sign_up("gordon").await;
    server
        .state()
        .store
        .set_user_role(&UserId(guest.user_id.clone()), Role::Guest)
        .await
        .expect("make a guest");
    for token in [&member.access_token, &guest.access_token] {
        let calls = [
            server
                .rpc_as(token)
                .call_proto::<_, pb::DisconnectConnectionResponse>(
                    "AdminService/DisconnectConnection",
                    &pb::DisconnectConnectionRequest {
                        connection_id: "1".into(),
                        reason: String::new(),
                    },
                )
                .await
                .map(|_| ()),
            server
                .rpc_as(token)
                .call_proto::<_, pb::DisconnectUserResponse>(
                    "AdminService/DisconnectUser",
                    &pb::DisconnectUserRequest {
                        user_id: victim.user_id.clone(),
                        revoke_sessions: false,
                        reason: String::new(),
                    },
                )
                .await
                .map(|_| ()),
            server
                .rpc_as(token)
                .call_proto::<_, pb::DrainNodeResponse>(
                    "AdminService/DrainNode",
                    &pb::DrainNodeRequest {
                        reason: "mine now".into(),
                    },
                )
                .await
                .map(|_| ()),
        ];
        for call in calls {
            expect_error(call, "permission_denied", 403);
        }
    }
}

both_backends!(
    disconnect_connection_closes_only_that_connection,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("rita").await;
        refused_to_members_and_guests(&server, &user).await;
        let url = server.ws_url("/ws");
        let mut first =
            WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        let mut second =
            WsClient::connect_authenticated(&url, WsCodec::Proto, &user.access_token).await;
        let listed: pb::ListConnectionsResponse = admin_call(
            &server,
            &admin,
            "ListConnections",
            &pb::ListConnectionsRequest {
                user_id: user.user_id.clone(),
            },
        )
        .await;
        let json = listed
            .connections
            .iter()
            .find(|c| c.transport.contains("json"))
            .expect("the JSON connection is listed");
        let reply: pb::DisconnectConnectionResponse = admin_call(
            &server,
            &admin,
            "DisconnectConnection",
            &pb::DisconnectConnectionRequest {
                connection_id: json.connection_id.clone(),
                reason: "too chatty".into(),
            },
        )
        .await;
        assert_eq!(reply.user_id, user.user_id);
        assert_eq!(
            closed_with(&mut first).await,
            (4504, "too chatty".to_owned())
        );
        // The other connection of the same user stays open and answers.
        assert!(
            matches!(
                second.next_push(Duration::from_millis(300)).await,
                Incoming::Timeout
            ),
            "the second connection is untouched"
        );
        let answer = second.subscribe("r_nosuchroom", None).await;
        assert!(
            answer.is_err(),
            "the second connection still answers: {answer:?}"
        );
        // Gone now: not_found; not a number: invalid_argument.
        let again = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::DisconnectConnectionResponse>(
                "AdminService/DisconnectConnection",
                &pb::DisconnectConnectionRequest {
                    connection_id: json.connection_id.clone(),
                    reason: String::new(),
                },
            )
            .await;
        expect_error(again, "not_found", 404);
        let bad = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::DisconnectConnectionResponse>(
                "AdminService/DisconnectConnection",
                &pb::DisconnectConnectionRequest {
                    connection_id: "c-nope".into(),
                    reason: String::new(),
                },
            )
            .await;
        expect_error(bad, "invalid_argument", 400);
    }
);

both_backends!(
    disconnect_user_closes_every_connection_with_4504,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("sam").await;
        let url = server.ws_url("/ws");
        let mut first =
            WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        let mut second =
            WsClient::connect_authenticated(&url, WsCodec::Proto, &user.access_token).await;
        let reply: pb::DisconnectUserResponse = admin_call(
            &server,
            &admin,
            "DisconnectUser",
            &pb::DisconnectUserRequest {
                user_id: user.user_id.clone(),
                revoke_sessions: true,
                reason: "account review".into(),
            },
        )
        .await;
        assert_eq!(reply.sessions_revoked, 1);
        assert_eq!(closed_with(&mut first).await.0, 4504);
        assert_eq!(closed_with(&mut second).await.0, 4504);
        // The sessions were revoked: the old token no longer works.
        let old = server
            .rpc_as(&user.access_token)
            .call_proto::<_, pb::GetMeResponse>("UserService/GetMe", &pb::GetMeRequest {})
            .await;
        expect_error(old, "unauthenticated", 401);
        let audit: pb::ListAuditLogResponse = admin_call(
            &server,
            &admin,
            "ListAuditLog",
            &pb::ListAuditLogRequest::default(),
        )
        .await;
        assert!(
            audit.entries.iter().any(|e| e.action == "disconnect_user"),
            "{:?}",
            audit.entries
        );
    }
);

both_backends!(
    drain_node_turns_clients_away_without_exiting,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("dora").await;
        let url = server.ws_url("/ws");
        let mut live =
            WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        let ready = server
            .http()
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200);
        // A reason is required.
        let no_reason = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::DrainNodeResponse>(
                "AdminService/DrainNode",
                &pb::DrainNodeRequest::default(),
            )
            .await;
        expect_error(no_reason, "invalid_argument", 400);
        let reply: pb::DrainNodeResponse = admin_call(
            &server,
            &admin,
            "DrainNode",
            &pb::DrainNodeRequest {
                reason: "kernel upgrade".into(),
            },
        )
        .await;
        assert!(reply.started);
        assert_eq!(reply.users_closed, 1);
        // Live clients are told to reconnect elsewhere.
        assert_eq!(closed_with(&mut live).await.0, 4001);
        // Not ready, with the reason.
        let ready = server
            .http()
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 503);
        let body = ready.text().await.expect("readyz body");
        assert!(
            body.contains("draining") && body.contains("kernel upgrade"),
            "{body}"
        );
        // New WebSockets are refused with a clear error.
        let refused = tokio_tungstenite::connect_async(url.as_str()).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert!(
                    body.contains("unavailable") && body.contains("draining"),
                    "{body}"
                );
            }
            other => panic!("expected a 503 refusal, got {other:?}"),
        }
        // The process still serves requests (an operator stops it), and draining
        // again succeeds without starting over.
        let me = server
            .rpc_as(&user.access_token)
            .call_proto::<_, pb::GetMeResponse>("UserService/GetMe", &pb::GetMeRequest {})
            .await
            .expect("requests are still served while draining");
        assert_eq!(me.user.map(|u| u.id), Some(user.user_id.clone()));
        let again: pb::DrainNodeResponse = admin_call(
            &server,
            &admin,
            "DrainNode",
            &pb::DrainNodeRequest {
                reason: "still".into(),
            },
        )
        .await;
        assert!(!again.started);
        let ready = server
            .http()
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let body = ready.text().await.expect("readyz body");
        assert!(
            body.contains("kernel upgrade"),
            "the first reason stays: {body}"
        );
    }
);
