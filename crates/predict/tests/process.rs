//! `prepare_process` keeps candle's matrix products on one thread without taking the
//! cores away from the rest of the process (capture and restore run in rayon's global pool).

#[test]
fn candle_gets_one_thread_and_the_global_pool_keeps_every_core() {
    // SAFETY: the first thing this test binary's only test does; nextest runs each test in
    // its own process, and no other thread of ours exists yet.
    unsafe {
        std::env::remove_var("RAYON_NUM_THREADS");
        kairos_predict::train::prepare_process();
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").as_deref(),
        Ok("1"),
        "candle reads RAYON_NUM_THREADS for its matrix products"
    );
    assert_eq!(
        rayon::current_num_threads(),
        cores,
        "rayon's global pool has one thread per core"
    );
    // The pool really runs work on that many threads at once.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let barrier = std::sync::Barrier::new(cores);
    rayon::scope(|scope| {
        for _ in 0..cores {
            scope.spawn(|_| {
                barrier.wait();
                seen.lock().unwrap().insert(std::thread::current().id());
            });
        }
    });
    assert_eq!(seen.lock().unwrap().len(), cores);
}
