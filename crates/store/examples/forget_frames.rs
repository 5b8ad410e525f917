//! Forgets all but every `KEEP_EVERY`-th frame of a replica's main timeline (and its head),
//! for the garbage collection benchmark (`bench/gc`) until `kairos forget` exists.
//!
//! Usage: cargo run --release -p kairos-store --example forget_frames -- DATA_DIR REPLICA KEEP_EVERY

use kairos_store::Store;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, data_dir, replica, keep_every] = args.as_slice() else {
        return Err("usage: forget_frames DATA_DIR REPLICA KEEP_EVERY".into());
    };
    let keep_every: usize = keep_every.parse()?;
    if keep_every == 0 {
        return Err("KEEP_EVERY must be at least 1".into());
    }
    let store = Store::open(std::path::Path::new(data_dir))?;
    let history = store.history(replica, "main")?;
    let last = history.len().saturating_sub(1);
    let forget: Vec<_> = history
        .iter()
        .enumerate()
        .filter(|(at, _)| *at != last && (at + 1) % keep_every != 0)
        .map(|(_, frame)| frame.id)
        .collect();
    let forgotten = store.forget_frames(&forget)?;
    println!("{forgotten} of {} frames forgotten", history.len());
    Ok(())
}
