//! The nemesis (`common/nemesis.rs`): five nodes, every link through a cuttable relay, rounds
//! of random faults and restarts while every node writes, and a check of every acknowledged
//! write after the final heal.
//!
//! `CETS_NEMESIS_SEED=<n>` replays one seed (printed on failure), `CETS_NEMESIS_ROUNDS` sets
//! the rounds per seed, `CETS_NEMESIS_SEEDS` the number of seeds. The long run:
//! `cargo test --release --test nemesis -- --ignored --nocapture`.

mod common;
/// The nemesis itself, over `common`'s mesh (only this test binary compiles it).
#[path = "common/nemesis.rs"]
mod nemesis;

use std::time::Instant;

async fn run_all(plans: Vec<nemesis::Plan>) {
    let (mut rounds, mut calls) = (0, 0);
    for plan in plans {
        let seed = plan.seed;
        let started = Instant::now();
        match nemesis::run(plan).await {
            Ok(r) => {
                rounds += r.rounds;
                calls += r.calls;
                eprintln!(
                    "nemesis seed {seed}: {} rounds, {} restarts, {} calls ({} acknowledged, {} failed), {} records, converged {:?} after the writers stopped, {:?} in all",
                    r.rounds, r.restarts, r.calls, r.acked, r.failed, r.records, r.converged_in, started.elapsed()
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("nemesis: {rounds} rounds, {calls} calls, no violation");
}

/// Two seeds of a few short rounds: part of the normal suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_short() {
    let mut plans = nemesis::plans(2, 4, 1000);
    for p in &mut plans {
        p.round_ms = (300, 1200);
    }
    run_all(plans).await;
}

/// Hundreds of rounds: `cargo test --release --test nemesis -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn nemesis_long() {
    run_all(nemesis::plans(5, 100, 7000)).await;
}
