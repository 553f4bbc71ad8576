//! The route table: every unary RPC of the protos, mapped one to one onto
//! `POST /roomcast.v1.<Service>/<Method>`, each a thin call into [`crate::domain`].

use std::future::Future;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{de::DeserializeOwned, Serialize};

use super::connect::{error_response, unary, RpcContext};
use crate::{
    domain,
    error::{ApiError, Code},
    proto::v1::{
        admin_service, auth_service, notification_service, publish_service, push_service,
        room_service, user_service,
    },
};

/// Registers every RPC route; returns the `Service/Method` names it registered.
pub fn configure(cfg: &mut web::ServiceConfig) -> Vec<String> {
    let mut table = Table {
        cfg,
        routed: Vec::new(),
    };
    auth_routes(&mut table);
    user_routes(&mut table);
    room_routes(&mut table);
    publish_routes(&mut table);
    notification_routes(&mut table);
    push_routes(&mut table);
    admin_routes(&mut table);
    table.routed
}

struct Table<'a> {
    cfg: &'a mut web::ServiceConfig,
    routed: Vec<String>,
}

impl Table<'_> {
    fn add<Req, Resp, F, Fut>(&mut self, service: &str, method: &str, handler: F)
    where
        Req: prost::Message + DeserializeOwned + Default + 'static,
        Resp: prost::Message + Serialize + 'static,
        F: Fn(RpcContext, Req) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<Resp, ApiError>> + 'static,
    {
        let path = format!("/{service}/{method}");
        self.routed.push(format!("{service}/{method}"));
        self.cfg.service(
            web::resource(path)
                .route(
                    web::post().to(move |req: HttpRequest, payload: web::Payload| {
                        unary(req, payload, handler.clone())
                    }),
                )
                .default_service(web::to(method_not_allowed)),
        );
    }
}

async fn method_not_allowed() -> HttpResponse {
    let error = ApiError::new(Code::Unimplemented, "RPCs are called with POST");
    error_response(&error, Some(405))
}

/// Any other path under an RPC prefix: Connect's `unimplemented`.
pub async fn unknown_rpc(req: HttpRequest) -> HttpResponse {
    error_response(
        &ApiError::new(Code::Unimplemented, format!("no such RPC: {}", req.path())),
        None,
    )
}

fn auth_routes(t: &mut Table<'_>) {
    use domain::auth;
    let s = auth_service::NAME;
    t.add(s, "SignUp", |c: RpcContext, r| async move {
        auth::sign_up(&c.state, c.client, r).await
    });
    t.add(s, "SignIn", |c: RpcContext, r| async move {
        auth::sign_in(&c.state, c.client, r).await
    });
    t.add(s, "Refresh", |c: RpcContext, r| async move {
        auth::refresh(&c.state, r).await
    });
    t.add(s, "SignOut", |c: RpcContext, r| async move {
        auth::sign_out(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "CreateApiKey", |c: RpcContext, r| async move {
        auth::create_api_key(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "ListApiKeys", |c: RpcContext, r| async move {
        auth::list_api_keys(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "RevokeApiKey", |c: RpcContext, r| async move {
        auth::revoke_api_key(&c.state, &c.principal().await?, r).await
    });
}

fn user_routes(t: &mut Table<'_>) {
    use domain::users;
    let s = user_service::NAME;
    t.add(s, "GetMe", |c: RpcContext, r| async move {
        users::get_me(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "GetUser", |c: RpcContext, r| async move {
        users::get_user(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "BatchGetUsers", |c: RpcContext, r| async move {
        users::batch_get_users(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "UpdateProfile", |c: RpcContext, r| async move {
        users::update_profile(&c.state, &c.principal().await?, r).await
    });
    t.add(s, "SearchUsers", |c: RpcContext, r| async move {
        users::search_users(&c.state, &c.principal().await?, r).await
    });
}

/// Every RoomService RPC needs an authenticated caller.
macro_rules! authed {
    ($t:expr, $service:expr, $method:literal, $f:path) => {
        $t.add($service, $method, |c: RpcContext, r| async move {
            $f(&c.state, &c.principal().await?, r).await
        })
    };
}

fn room_routes(t: &mut Table<'_>) {
    use domain::{messages, rooms};
    let s = room_service::NAME;
    authed!(t, s, "CreateRoom", rooms::create_room);
    authed!(t, s, "GetRoom", rooms::get_room);
    authed!(t, s, "ListRooms", rooms::list_rooms);
    authed!(t, s, "UpdateRoom", rooms::update_room);
    authed!(t, s, "JoinRoom", rooms::join_room);
    authed!(t, s, "LeaveRoom", rooms::leave_room);
    authed!(t, s, "InviteMember", rooms::invite_member);
    authed!(t, s, "ListMembers", rooms::list_members);
    authed!(t, s, "SendMessage", messages::send_message);
    authed!(t, s, "ListMessages", messages::list_messages);
    authed!(t, s, "EditMessage", messages::edit_message);
    authed!(t, s, "DeleteMessage", messages::delete_message);
    authed!(t, s, "MarkRead", messages::mark_read);
    authed!(t, s, "KickMember", rooms::kick_member);
    authed!(t, s, "BanMember", rooms::ban_member);
    authed!(t, s, "UnbanMember", rooms::unban_member);
    authed!(t, s, "MuteMember", rooms::mute_member);
    authed!(t, s, "UnmuteMember", rooms::unmute_member);
    authed!(t, s, "SetMemberRole", rooms::set_member_role);
    authed!(
        t,
        s,
        "UpdateLiveControls",
        domain::live::update_live_controls
    );
    authed!(t, s, "PinMessage", domain::live::pin_message);
}

/// PublishService: API keys and server admins (checked in the domain).
fn publish_routes(t: &mut Table<'_>) {
    use domain::publish;
    let s = publish_service::NAME;
    authed!(t, s, "Publish", publish::publish);
    authed!(t, s, "Broadcast", publish::broadcast);
    authed!(t, s, "PublishToUser", publish::publish_to_user);
    authed!(t, s, "DisconnectUser", publish::disconnect_user);
    authed!(t, s, "GetPresence", publish::get_presence);
    authed!(t, s, "GetOnlineCounts", publish::get_online_counts);
}

fn notification_routes(t: &mut Table<'_>) {
    use domain::{invitations, notifications};
    let s = notification_service::NAME;
    authed!(t, s, "ListNotifications", notifications::list_notifications);
    authed!(
        t,
        s,
        "MarkNotificationsRead",
        notifications::mark_notifications_read
    );
    authed!(
        t,
        s,
        "CountUnreadNotifications",
        notifications::count_unread_notifications
    );
    authed!(t, s, "ListInvitations", invitations::list_invitations);
    authed!(t, s, "AcceptInvitation", invitations::accept_invitation);
    authed!(t, s, "DeclineInvitation", invitations::decline_invitation);
}

/// PushService: long-polling; the wait ends before the request's deadline.
fn push_routes(t: &mut Table<'_>) {
    use domain::push;
    let s = push_service::NAME;
    t.add(s, "Poll", |c: RpcContext, r| async move {
        push::poll(&c.state, &c.principal().await?, c.deadline, r).await
    });
}

fn admin_routes(t: &mut Table<'_>) {
    use domain::admin;
    let s = admin_service::NAME;
    authed!(t, s, "ListConnections", admin::list_connections);
    authed!(t, s, "GetRoomStats", admin::get_room_stats);
    authed!(t, s, "RevokeUserSessions", admin::revoke_user_sessions);
    authed!(t, s, "SuspendUser", admin::suspend_user);
    authed!(t, s, "ReinstateUser", admin::reinstate_user);
    authed!(t, s, "DeleteRoom", admin::delete_room);
    authed!(t, s, "GetConfig", admin::get_config);
    authed!(t, s, "Announce", admin::announce);
    authed!(t, s, "ListAuditLog", admin::list_audit_log);
    authed!(t, s, "ListAccessRules", admin::list_access_rules);
    authed!(t, s, "CreateAccessRule", admin::create_access_rule);
    authed!(t, s, "UpdateAccessRule", admin::update_access_rule);
    authed!(t, s, "DeleteAccessRule", admin::delete_access_rule);
    authed!(t, s, "DisconnectConnection", admin::disconnect_connection);
    authed!(t, s, "DisconnectUser", admin::disconnect_user);
    authed!(t, s, "DrainNode", admin::drain_node);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unary method of every served service has a route, and nothing else does.
    #[test]
    fn every_proto_method_is_routed() {
        let mut expected: Vec<String> = Vec::new();
        for (name, methods) in [
            (auth_service::NAME, auth_service::UNARY_METHODS),
            (user_service::NAME, user_service::UNARY_METHODS),
            (room_service::NAME, room_service::UNARY_METHODS),
            (publish_service::NAME, publish_service::UNARY_METHODS),
            (
                notification_service::NAME,
                notification_service::UNARY_METHODS,
            ),
            (push_service::NAME, push_service::UNARY_METHODS),
            (admin_service::NAME, admin_service::UNARY_METHODS),
        ] {
            expected.extend(methods.iter().map(|m| format!("{name}/{m}")));
        }
        let mut routed = Vec::new();
        let app = actix_web::App::new().configure(|cfg| routed = configure(cfg));
        drop(app);
        expected.sort();
        routed.sort();
        assert_eq!(routed, expected);
    }
}
