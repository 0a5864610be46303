//! The nemesis (`common/nemesis.rs`): five nodes, every link through a cuttable relay, rounds
//! of random faults and restarts while every node writes, and a check of every acknowledged
//! write after the final heal.
//!
//! Faults include a delay of every packet with jitter; the short run's second seed keeps one
//! throughout. `CETS_NEMESIS_SEED=<n>` replays one seed (printed on failure),
//! `CETS_NEMESIS_ROUNDS` sets the rounds per seed, `CETS_NEMESIS_SEEDS` the number of seeds.
//! The long run:
//! `cargo test --release --test nemesis -- --ignored --nocapture`.

mod common;
/// The nemesis itself, over `common`'s mesh (only this test binary compiles it).
#[path = "common/nemesis.rs"]
mod nemesis;

use std::time::{Duration, Instant};

async fn run_all(plans: Vec<nemesis::Plan>) {
    let (mut rounds, mut calls) = (0, 0);
    for plan in plans {
        let (seed, plan_delay) = (plan.seed, plan.delay);
        let started = Instant::now();
        match nemesis::run(plan).await {
            Ok(r) => {
                rounds += r.rounds;
                calls += r.calls;
                let delay = plan_delay.map_or(String::new(), |(b, j)| {
                    format!(" (every packet delayed {b:?} + up to {j:?} each way)")
                });
                eprintln!(
                    "nemesis seed {seed}{delay}: {} rounds, {} restarts, {} calls ({} acknowledged, {} failed), {} records, converged {:?} after the writers stopped, {:?} in all",
                    r.rounds, r.restarts, r.calls, r.acked, r.failed, r.records, r.converged_in, started.elapsed()
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("nemesis: {rounds} rounds, {calls} calls, no violation");
}

/// Two seeds of a few short rounds: part of the normal suite. The second runs with every
/// packet delayed 30 to 50 ms each way (out of order within that), throughout its faults and
/// until the members converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_short() {
    let mut plans = nemesis::plans(2, 4, 1000);
    for (i, p) in plans.iter_mut().enumerate() {
        p.round_ms = (300, 1200);
        if i % 2 == 1 {
            p.delay = Some((Duration::from_millis(30), Duration::from_millis(20)));
        }
    }
    run_all(plans).await;
}

/// Hundreds of rounds: `cargo test --release --test nemesis -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn nemesis_long() {
    run_all(nemesis::plans(5, 100, 7000)).await;
}
