//! `broker-floor`: the least a queue-change can cost the broker. The same durable
//! conditional writes the service makes (JetStream, file storage, one message kept per
//! subject, a message id, the expected last subject sequence), made directly with the
//! client library at the same concurrency, no HTTP. `queue-change` is reported as a ratio
//! to this.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use crate::hist::Histogram;
use crate::worker::now_micros;

#[derive(clap::Args)]
pub struct BrokerFloorArgs {
    /// The NATS server.
    #[arg(long)]
    nats: String,
    /// The stream, created as the service creates it if missing.
    #[arg(long, default_value = "FLAGSMITH_SSE")]
    stream: String,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub async fn run(args: BrokerFloorArgs) -> anyhow::Result<()> {
    let client = async_nats::connect(&args.nats).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec!["flagsmith.environment.>".to_owned()],
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(86_400),
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_s);
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let js = js.clone();
        let stream_name = args.stream.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("flagsmith.environment.floor_{c}");
            let mut hist = Histogram::default();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut last = 0u64;
            while Instant::now() < deadline {
                let micros = now_micros();
                let payload = Bytes::from(format!(
                    "{{\"updated_at\": {}.{:06}}}",
                    micros / 1_000_000,
                    micros % 1_000_000
                ));
                let publish = jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(format!("floor_{c}:{micros}"))
                    .expected_last_subject_sequence(last);
                let sent = Instant::now();
                let acked = match js.send_publish(subject.clone(), publish).await {
                    Ok(ack) => ack.await,
                    Err(err) => Err(err),
                };
                match acked {
                    Ok(ack) => {
                        last = ack.sequence;
                        ok += 1;
                        hist.record(sent.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        // Another run left this subject at another sequence: start over
                        // from what the stream holds (as the service re-reads).
                        failed += 1;
                        last = match js.get_stream(&stream_name).await {
                            Ok(stream) => stream
                                .get_last_raw_message_by_subject(&subject)
                                .await
                                .map_or(0, |m| m.sequence),
                            Err(_) => 0,
                        };
                    }
                }
            }
            (hist, ok, failed)
        }));
    }
    let mut hist = Histogram::default();
    let (mut ok, mut failed) = (0u64, 0u64);
    for task in tasks {
        let (h, o, f) = task.await?;
        hist.merge(&h);
        ok += o;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = ok as f64 / secs;
    println!(
        "broker floor: {ok} conditional writes acknowledged in {secs:.1} s at concurrency {}: {rate:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms; {failed} refused and retried",
        args.concurrency,
        hist.quantile(0.5) as f64 / 1000.0,
        hist.quantile(0.99) as f64 / 1000.0,
    );
    if let Some(path) = args.json {
        let report = serde_json::json!({
            "acknowledged": ok,
            "refused": failed,
            "seconds": secs,
            "per_second": rate,
            "concurrency": args.concurrency,
            "p50_ms": hist.quantile(0.5) as f64 / 1000.0,
            "p99_ms": hist.quantile(0.99) as f64 / 1000.0,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
