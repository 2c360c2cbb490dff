//! Criterion benches of the pure hot-path pieces: frame building, client
//! message parsing, frame decoding, the channel table, the interest map,
//! the cross-core queue and an in-process fan-out (no sockets), whose
//! per-subscriber cost shows as the slope between 1, 100 and 10,000.
//!
//! Run: `cargo bench --bench protocol` (add `-- fanout` to filter).

use std::hint::black_box;
use std::task::{Context, Waker};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herald::engine::bus::Bus;
use herald::engine::interest::Interest;
use herald::engine::shard::{Keepalive, Limits, Shard};
use herald::engine::stats::CoreStats;
use herald::frontends::native::protocol::{message_frame, parse_request};
use herald::transport::tcp::Batch;
use herald::transport::ws::codec::{apply_mask, Decoder};

fn limits() -> Limits {
    Limits {
        send_queue_limit: 1 << 30,
        max_subscriptions: 1 << 20,
        close_timeout_ms: 5000,
        publish_rate: 0,
        keepalive: Keepalive::off(),
        closes: herald::worker::CLOSES,
        clock: herald::clock::now_ms,
        coalesce: false,
    }
}

fn frame_building(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_build");
    for size in [64usize, 1024, 16 * 1024] {
        let data = format!("\"{}\"", "x".repeat(size - 2));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| message_frame(black_box("chat:room-42"), black_box(data)))
        });
    }
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_request");
    let publish = br#"{"op":"publish","channel":"chat:room-42","data":{"user":"u1","text":"hello there","ts":1767225600123},"id":17}"#;
    let subscribe = br#"{"op":"subscribe","channel":"chat:room-42","id":1}"#;
    g.throughput(Throughput::Bytes(publish.len() as u64));
    g.bench_function("publish", |b| {
        b.iter(|| parse_request(black_box(publish)).is_ok())
    });
    g.bench_function("subscribe", |b| {
        b.iter(|| parse_request(black_box(subscribe)).is_ok())
    });
    g.bench_function("invalid", |b| {
        b.iter(|| parse_request(black_box(b"{\"op\":")).is_err())
    });
    g.finish();
}

/// A masked client text frame holding `payload`.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut out = vec![0x81];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let mut p = payload.to_vec();
    apply_mask(&mut p, mask);
    out.extend_from_slice(&p);
    out
}

fn decoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_decode");
    for size in [64usize, 1024, 16 * 1024] {
        let frame = client_frame(&vec![b'a'; size]);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &frame, |b, frame| {
            let mut d = Decoder::new(1 << 20);
            let mut buf = frame.clone();
            b.iter(|| {
                buf.copy_from_slice(frame);
                black_box(d.decode(&mut buf).is_ok())
            })
        });
    }
    g.finish();
}

fn channel_table(c: &mut Criterion) {
    let interest = Interest::new();
    let mut shard = Shard::new(
        0,
        limits(),
        std::sync::Arc::new(CoreStats::new(1)),
        herald::frontends::ENCODERS,
    );
    let keys: Vec<usize> = (0..1000)
        .map(|_| {
            shard
                .open(-1, herald::frontends::native::protocol::ENCODING, 1001)
                .0
        })
        .collect();
    c.bench_function("channel_table/subscribe_unsubscribe", |b| {
        let mut i = 0;
        b.iter(|| {
            let key = keys[i % keys.len()];
            i += 1;
            shard.subscribe(key, "bench:chan", &interest).ok();
            shard.unsubscribe(key, "bench:chan", &interest);
        })
    });
    for name in (0..10_000).map(|i| format!("ch:{i}")) {
        interest.add(&name, 1);
    }
    c.bench_function("interest/lookup_hit", |b| {
        b.iter(|| interest.cores(black_box("ch:4242")))
    });
    c.bench_function("interest/lookup_miss", |b| {
        b.iter(|| interest.cores(black_box("nope")))
    });
}

fn cross_core_queue(c: &mut Criterion) {
    let bus = Bus::new(2, 1 << 16);
    let msg = std::sync::Arc::new(message_frame("chat", "1"));
    let mut g = c.benchmark_group("bus");
    g.throughput(Throughput::Elements(64));
    g.bench_function("send_drain_64", |b| {
        b.iter(|| {
            for _ in 0..64 {
                bus.send(0, 1, msg.clone());
            }
            bus.drain(1, 64, |m| {
                black_box(m);
            })
        })
    });
    g.finish();
}

/// A shard with `n` connections subscribed to channel `room`.
fn room_of(n: usize) -> (Shard, Vec<(usize, u64)>) {
    let interest = Interest::new();
    let mut shard = Shard::new(
        0,
        limits(),
        std::sync::Arc::new(CoreStats::new(1)),
        herald::frontends::ENCODERS,
    );
    let conns: Vec<(usize, u64)> = (0..n)
        .map(|_| shard.open(-1, herald::frontends::native::protocol::ENCODING, 1001))
        .collect();
    for &(k, _) in &conns {
        shard.subscribe(k, "room", &interest).ok();
    }
    (shard, conns)
}

/// Every connection's writer batch filled and written, as the reactor does
/// (no sockets).
fn write_all(shard: &mut Shard, conns: &[(usize, u64)], batch: &mut Batch, cx: &mut Context<'_>) {
    for &(k, gen) in conns {
        let _ = shard.fill(k, gen, batch, usize::MAX, cx);
        let len = batch.len();
        batch.advance(len);
        shard.written(k, gen, len);
    }
}

/// One publish delivered to N local subscribers, then every subscriber's
/// writer batch filled, as the reactor does (no sockets).
fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for n in [1usize, 100, 10_000] {
        let (mut shard, conns) = room_of(n);
        let mut batch = Batch::new();
        let mut cx = Context::from_waker(Waker::noop());
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let msg = message_frame(
                    "room",
                    r#"{"text":"hello, sixty-four bytes of json payload here!!"}"#,
                );
                shard.deliver(&msg, None);
                write_all(&mut shard, &conns, &mut batch, &mut cx);
            })
        });
    }
    g.finish();
}

/// The same fan-out when every subscriber follows its user's channel
/// (personal channels), at the worst case: each delivery gets its ack
/// ping (the previous one was answered), and each pong is handled, its
/// place committed to the users' durable subscriptions.
fn fanout_following(c: &mut Criterion) {
    use herald::engine::personal::{Cursor, Durable, ACK_PAYLOAD};
    let mut g = c.benchmark_group("fanout_following");
    for n in [100usize] {
        let (mut shard, conns) = room_of(n);
        let durable = Durable::default();
        for (i, &(k, gen)) in conns.iter().enumerate() {
            let user = format!("u{i}");
            let start = Cursor {
                epoch: "e".into(),
                offset: 0,
            };
            durable.subscribe(0, &user, "room", start).unwrap();
            shard.follow.start(k, gen, 0, &user);
            shard.follow.add(k, "room", "room", "e".into(), 0, false);
        }
        let mut batch = Batch::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut offset = 0u64;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let mut msg = message_frame(
                    "room",
                    r#"{"text":"hello, sixty-four bytes of json payload here!!"}"#,
                );
                offset += 1;
                msg.set_offset(offset, herald::engine::message::Encoding(u8::MAX));
                shard.deliver(&msg, None);
                write_all(&mut shard, &conns, &mut batch, &mut cx);
                // Every client answers its ping.
                for &(k, _) in &conns {
                    let answered = shard
                        .follow
                        .pong(k, ACK_PAYLOAD, |ns, user, ch, epoch, at| {
                            durable.commit(ns, user, ch, epoch, at)
                        });
                    assert!(answered, "the ping of {k}");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    frame_building,
    parsing,
    decoding,
    channel_table,
    cross_core_queue,
    fanout,
    fanout_following
);
criterion_main!(benches);
