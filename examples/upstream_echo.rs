//! A tiny service to put behind portcullis (`[upstream]`, messages mode): it reads the PROXY
//! v2 header that opens each connection, logs who the client is, and answers each frame
//! with `<identity>: <payload>`.
//!
//!     cargo run --example upstream_echo -- 127.0.0.1:7000
//!     cargo run --example upstream_echo -- unix:/run/app.sock   # servers = ["unix:/run/app.sock"]
//!
//! What it receives, per connection: the PROXY v2 header (source = the client's address,
//! TLVs 0xE0 identity, 0xE1 method, 0xE2 framing, 0x20 SSL...), then frames, each a `u32`
//! big-endian length and that many bytes. What it sends back: frames in the same format.
//! Health checks arrive as a LOCAL header and an immediate close.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

/// The v2 signature, the first 12 bytes of every PROXY v2 header.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// This service's own cap on one message (portcullis already enforces its caps).
const MAX_FRAME: usize = 1 << 20;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:7000".into());
    if let Some(path) = addr.strip_prefix("unix:") {
        let listener = UnixListener::bind(path)?;
        println!("upstream_echo listening on unix:{path}");
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(serve(stream, format!("unix:{path}")));
        }
    }
    let listener = TcpListener::bind(&addr).await?;
    // Tests start it on port 0 and read the address from this line.
    println!("upstream_echo listening on {}", listener.local_addr()?);
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve(stream, peer.to_string()));
    }
}

/// Who the header says the client is.
struct Client {
    source: String,
    identity: String,
    method: String,
    framing: String,
}

/// Serves one connection from the gateway (`peer`: where it came from, for the log).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, peer: String) {
    if let Err(e) = relay(&mut stream, &peer).await {
        eprintln!("{peer}: {e}");
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: &str,
) -> std::io::Result<()> {
    let Some(client) = read_header(stream).await? else {
        return Ok(()); // a health check (LOCAL): nothing follows
    };
    println!(
        "client {} identity={} method={} framing={} (via {peer})",
        client.source, client.identity, client.method, client.framing
    );
    while let Some(payload) = read_frame(stream).await? {
        let mut reply = format!("{}: ", client.identity).into_bytes();
        reply.extend_from_slice(&payload);
        stream
            .write_all(&(reply.len() as u32).to_be_bytes())
            .await?;
        stream.write_all(&reply).await?;
    }
    Ok(())
}

/// Reads the PROXY v2 header; `None` for a LOCAL one.
async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Option<Client>> {
    let mut header = vec![0u8; 16];
    stream.read_exact(&mut header).await?;
    if &header[..12] != SIGNATURE {
        return Err(std::io::Error::other(
            "no PROXY v2 header (send_proxy = \"v2\"?)",
        ));
    }
    let len = u16::from_be_bytes([header[14], header[15]]) as usize;
    header.resize(16 + len, 0);
    stream.read_exact(&mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let source = match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => format!("{}:{}", a.source_address, a.source_port),
        ppp::v2::Addresses::IPv6(a) => format!("[{}]:{}", a.source_address, a.source_port),
        _ => return Ok(None),
    };
    let mut client = Client {
        source,
        identity: String::new(),
        method: String::new(),
        framing: String::new(),
    };
    for tlv in parsed.tlvs().flatten() {
        let value = String::from_utf8_lossy(&tlv.value).into_owned();
        match tlv.kind {
            0xE0 => client.identity = value,
            0xE1 => client.method = value,
            0xE2 => client.framing = value,
            _ => {}
        }
    }
    Ok(Some(client))
}

/// One frame's payload; `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(Some(payload))
}
