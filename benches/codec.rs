//! Decoder throughput: binary frames of 64 B, 4 KiB and 64 KiB, and text lines.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::codec::{Message, MessageCodec};
use portcullis::config::FramingMode;

/// A buffer holding `count` messages of `size` bytes in `framing`.
fn stream(binary: bool, size: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * (size + 4));
    for _ in 0..count {
        if binary {
            out.extend_from_slice(&(size as u32).to_be_bytes());
            out.extend(std::iter::repeat_n(0xA5, size));
        } else {
            out.extend(std::iter::repeat_n(b'x', size - 1));
            out.push(b'\n');
        }
    }
    out
}

fn decode_all(mode: FramingMode, bytes: &[u8]) -> usize {
    let mut codec = MessageCodec::new(mode, 65536, 4096);
    let mut buf = BytesMut::from(bytes);
    let mut n = 0;
    while let Ok(Some(Message::Request(_))) = codec.decode_message(&mut buf) {
        n += 1;
    }
    n
}

fn decoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, binary, size) in [
        ("binary", true, 64),
        ("binary", true, 4096),
        ("binary", true, 65536),
        ("text", false, 64),
        ("text", false, 4096),
    ] {
        let count = (1 << 20) / size;
        let bytes = stream(binary, size, count);
        let mode = if binary {
            FramingMode::Binary
        } else {
            FramingMode::Text
        };
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, size), &bytes, |b, bytes| {
            b.iter(|| assert_eq!(decode_all(mode, bytes), count))
        });
    }
    group.finish();
}

criterion_group!(benches, decoder);
criterion_main!(benches);
