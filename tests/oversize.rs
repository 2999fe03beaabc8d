//! Messages over their caps: `ERR TOO_LARGE <cap>`, the connection closed, and no allocation
//! of the claimed size. A counting global allocator records the largest single allocation
//! made anywhere in this test binary (the gateway runs in-process).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// No single allocation anywhere may approach a claimed size: 1 MiB is 16x the frame cap
/// and far below 16 MiB or 4 GiB.
const ALLOCATION_LIMIT: usize = 1 << 20;

#[tokio::test]
async fn binary_length_u32_max_is_refused_without_allocating() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(
        c.request_frame(format!("AUTH {ALICE_TOKEN}").as_bytes())
            .await,
        b"OK alice"
    );
    c.send(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3]).await;
    assert_eq!(c.read_frame().await, b"ERR TOO_LARGE 65536");
    c.expect_closed().await;
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < ALLOCATION_LIMIT,
        "largest allocation {largest} bytes"
    );
}

#[tokio::test]
async fn first_frame_over_16_mib_is_read_as_text_and_refused() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::connect(server.addr, &certs).await;
    // 0x01000000 = 16 MiB: the first byte is not 0x00, so this is a text "line" that never
    // ends; it is refused at the line cap in force, before authentication
    // `protocol.max_preauth_bytes`.
    let mut bytes = vec![0x01, 0x00, 0x00, 0x00];
    bytes.extend(std::iter::repeat_n(b'x', 5000));
    c.send(&bytes).await;
    assert_eq!(c.read_line().await, "ERR TOO_LARGE 1024");
    c.expect_closed().await;
    assert!(LARGEST.load(Ordering::Relaxed) < ALLOCATION_LIMIT);
}

#[tokio::test]
async fn frame_one_over_the_cap_is_refused_and_at_the_cap_passes() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let cap = 65536;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(
        c.request_frame(format!("AUTH {ALICE_TOKEN}").as_bytes())
            .await,
        b"OK alice"
    );
    let mut at_cap = b"ECHO ".to_vec();
    at_cap.resize(cap, 0xAB);
    let reply = c.request_frame(&at_cap).await;
    assert_eq!(reply.len(), cap - 2);
    assert_eq!(&reply[..3], b"OK ");
    assert!(reply[3..].iter().all(|&b| b == 0xAB));

    // Announce cap + 1 and send only part of it: the reply comes from the header alone.
    let mut over = ((cap + 1) as u32).to_be_bytes().to_vec();
    over.extend(std::iter::repeat_n(0u8, 1000));
    c.send(&over).await;
    assert_eq!(
        c.read_frame().await,
        format!("ERR TOO_LARGE {cap}").as_bytes()
    );
    c.expect_closed().await;
}

#[tokio::test]
async fn text_line_over_the_cap_is_refused_and_at_the_cap_passes() {
    let certs = TestCerts::new();
    let server = TestServer::start(test_config(&certs)).await;
    let mut c = Client::authed(server.addr, &certs).await;
    let at_cap = format!("ECHO {}", "y".repeat(4096 - 5));
    assert_eq!(at_cap.len(), 4096);
    assert_eq!(
        c.request_line(&at_cap).await,
        format!("OK {}", "y".repeat(4091))
    );
    assert_eq!(
        c.request_line(&format!("{at_cap}\r")).await.len(),
        4094,
        "CR is not counted"
    );
    // One byte over, and the client keeps sending: the reply still arrives, then the close.
    let over = format!("ECHO {}", "z".repeat(4096 - 4));
    c.send(over.as_bytes()).await;
    c.send(&vec![b'z'; 64 * 1024]).await;
    assert_eq!(c.read_line().await, "ERR TOO_LARGE 4096");
    c.expect_closed().await;
    assert!(LARGEST.load(Ordering::Relaxed) < ALLOCATION_LIMIT);
}

#[tokio::test]
async fn configured_caps_are_used() {
    let certs = TestCerts::new();
    let mut config = test_config(&certs);
    config.protocol.max_frame_bytes = 100;
    config.protocol.max_line_bytes = 10;
    let server = TestServer::start(config).await;
    let mut c = Client::connect(server.addr, &certs).await;
    assert_eq!(
        c.request_line("0123456789").await,
        "ERR NOAUTH authenticate first: AUTH <token>"
    );
    assert_eq!(c.request_line("0123456789A").await, "ERR TOO_LARGE 10");
    c.expect_closed().await;
    let mut b = Client::connect(server.addr, &certs).await;
    assert_eq!(b.request_frame(&[b'P'; 101]).await, b"ERR TOO_LARGE 100");
    b.expect_closed().await;
}
