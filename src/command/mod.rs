//! Commands (SPEC section 2.2): parse a request into a [`Command`], check the NOAUTH gate,
//! then apply it. One file per command.

mod auth;
mod echo;
mod help;
mod ping;
mod quit;
mod whoami;

use bytes::Bytes;

use crate::auth::{Principal, TokenStore};
use crate::codec::Framing;
use crate::config::AuthMode;
use crate::error::ErrorCode;
pub use crate::error::Verb;

/// A request split into its verb and the bytes after the first space, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub verb: Verb,
    pub arg: Option<Bytes>,
}

impl Request {
    pub fn parse(message: Bytes) -> Request {
        match memchr::memchr(b' ', &message) {
            Some(space) => Request {
                verb: Verb::from_bytes(&message[..space]),
                arg: Some(message.slice(space + 1..)),
            },
            None => Request {
                verb: Verb::from_bytes(&message),
                arg: None,
            },
        }
    }
}

/// A reply body after `OK `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(Bytes),
    Err(ErrorCode, &'static str),
}

impl Reply {
    fn ok(text: impl Into<Bytes>) -> Reply {
        Reply::Ok(text.into())
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }

    /// The reply's wire form in pieces, so that ECHO data is copied only into the output.
    pub fn parts(&self) -> [&[u8]; 4] {
        match self {
            Reply::Ok(body) => [b"OK ", body, b"", b""],
            Reply::Err(code, "") => [b"ERR ", code.as_str().as_bytes(), b"", b""],
            Reply::Err(code, why) => [b"ERR ", code.as_str().as_bytes(), b" ", why.as_bytes()],
        }
    }
}

/// What the connection must do after sending the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// `QUIT`: close_notify and close.
    Close,
    /// A failed `AUTH`: counts towards a ban of the client.
    AuthFailed,
}

/// What a command may read and change of its connection.
pub struct Context<'a> {
    pub principal: &'a mut Option<Principal>,
    pub mode: AuthMode,
    pub tokens: &'a TokenStore,
    pub client_ip: std::net::IpAddr,
    /// `TLSv1_2` or `TLSv1_3`.
    pub tls_version: &'static str,
    /// The cipher suite as rustls names it.
    pub cipher: &'static str,
    pub framing: Framing,
}

impl Context<'_> {
    /// True when commands beyond the pre-auth set may be served.
    pub fn authenticated(&self) -> bool {
        self.mode == AuthMode::None || self.principal.is_some()
    }
}

/// Serves one request.
pub fn apply(request: Request, ctx: &mut Context<'_>) -> (Reply, After) {
    if !request.verb.allowed_before_auth() && !ctx.authenticated() {
        return (
            Reply::Err(ErrorCode::NoAuth, "authenticate first: AUTH <token>"),
            After::Continue,
        );
    }
    let arg = request.arg;
    match request.verb {
        Verb::Ping => ping::apply(arg),
        Verb::Echo => echo::apply(arg),
        Verb::Auth => auth::apply(arg, ctx),
        Verb::Whoami => whoami::apply(arg, ctx),
        Verb::Help => help::apply(arg),
        Verb::Quit => quit::apply(arg),
        Verb::Unknown => (
            Reply::Err(ErrorCode::UnknownCommand, "try HELP"),
            After::Continue,
        ),
    }
}

/// Commands that take no argument refuse one; a trailing space typed at a terminal is fine.
fn no_argument(arg: &Option<Bytes>) -> Result<(), (Reply, After)> {
    match arg {
        Some(a) if !a.iter().all(|&b| b == b' ') => Err((
            Reply::Err(ErrorCode::BadRequest, "this command takes no argument"),
            After::Continue,
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenEntry;

    fn ctx<'a>(
        principal: &'a mut Option<Principal>,
        tokens: &'a TokenStore,
        mode: AuthMode,
    ) -> Context<'a> {
        Context {
            principal,
            mode,
            tokens,
            client_ip: "192.0.2.1".parse().unwrap(),
            tls_version: "TLSv1_3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            framing: Framing::Text,
        }
    }

    fn run(line: &[u8], ctx: &mut Context<'_>) -> (Vec<u8>, After) {
        let (reply, after) = apply(Request::parse(Bytes::copy_from_slice(line)), ctx);
        (reply.parts().concat(), after)
    }

    #[test]
    fn verbs_are_case_insensitive_and_gated() {
        let tokens = TokenStore::from_entries(&[TokenEntry {
            name: "alice".into(),
            sha256: crate::auth::token_digest_hex("tok"),
        }])
        .unwrap();
        let mut p = None;
        let mut c = ctx(&mut p, &tokens, AuthMode::Any);
        assert_eq!(run(b"ping", &mut c).0, b"OK PONG");
        assert!(run(b"ECHO hi", &mut c).0.starts_with(b"ERR NOAUTH"));
        assert!(run(b"FOO", &mut c).0.starts_with(b"ERR NOAUTH"));
        assert_eq!(
            run(b"AUTH nope", &mut c),
            (b"ERR AUTH_FAILED".to_vec(), After::AuthFailed)
        );
        assert_eq!(run(b"auth tok", &mut c).0, b"OK alice");
        assert_eq!(run(b"ECHO a b\0\xff", &mut c).0, b"OK a b\0\xff");
        assert!(run(b"ECHO", &mut c).0.starts_with(b"ERR BAD_REQUEST"));
        assert_eq!(run(b"ECHO ", &mut c).0, b"OK ");
        assert!(run(b"FOO", &mut c).0.starts_with(b"ERR UNKNOWN_COMMAND"));
        assert_eq!(
            run(b"HELP", &mut c).0,
            b"OK PING ECHO AUTH WHOAMI HELP QUIT"
        );
        assert_eq!(
            run(b"WHOAMI", &mut c).0,
            b"OK identity=alice ip=192.0.2.1 tls=TLSv1_3 cipher=TLS13_AES_128_GCM_SHA256 framing=text"
        );
        assert_eq!(run(b"QUIT", &mut c), (b"OK BYE".to_vec(), After::Close));
    }

    #[test]
    fn mode_none_is_anonymous_and_mtls_refuses_tokens() {
        let tokens = TokenStore::default();
        let mut p = None;
        let mut c = ctx(&mut p, &tokens, AuthMode::None);
        assert!(run(b"WHOAMI", &mut c)
            .0
            .starts_with(b"OK identity=anonymous "));
        let mut p = None;
        let mut c = ctx(&mut p, &tokens, AuthMode::Mtls);
        assert_eq!(run(b"AUTH x", &mut c).0, b"ERR AUTH_FAILED");
    }
}
