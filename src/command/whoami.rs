//! `WHOAMI` → identity, client IP, TLS version, cipher suite and framing: what an operator
//! at `openssl s_client` needs to see that the gateway sees them as they expect.

use bytes::Bytes;

use super::{no_argument, After, Context, Reply};

pub fn apply(arg: Option<Bytes>, ctx: &Context<'_>) -> (Reply, After) {
    if let Err(refusal) = no_argument(&arg) {
        return refusal;
    }
    let identity = ctx
        .principal
        .as_ref()
        .map_or("anonymous", |p| p.identity.as_str());
    let text = format!(
        "identity={identity} ip={} tls={} cipher={} framing={}",
        ctx.client_ip,
        ctx.tls_version,
        ctx.cipher,
        ctx.framing.as_str()
    );
    (Reply::ok(text), After::Continue)
}
