//! `AUTH <token>` → `OK <identity>` or `ERR AUTH_FAILED`.

use bytes::Bytes;

use super::{After, Context, Reply};
use crate::auth::AuthMethod;
use crate::config::AuthMode;
use crate::error::ErrorCode;

pub fn apply(arg: Option<Bytes>, ctx: &mut Context<'_>) -> (Reply, After) {
    let failed = (Reply::Err(ErrorCode::AuthFailed, ""), After::AuthFailed);
    // In mtls mode only a certificate authenticates: every AUTH fails (and counts).
    if ctx.mode == AuthMode::Mtls {
        crate::metrics::auth(AuthMethod::Token, false);
        return failed;
    }
    let Some(principal) = arg.and_then(|token| ctx.tokens.verify(&token)) else {
        crate::metrics::auth(AuthMethod::Token, false);
        return failed;
    };
    crate::metrics::auth(AuthMethod::Token, true);
    let reply = Reply::ok(principal.identity.clone());
    *ctx.principal = Some(principal);
    (reply, After::Continue)
}
