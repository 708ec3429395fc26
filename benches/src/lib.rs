//! Switchyard's benchmarks: criterion micro-benches of hot paths in `benches/` (route lookup
//! and route changes, `benches/routing.rs`) and end-to-end load harnesses in `src/bin/`
//! (`append_overhead`: what the proxy adds to an append over direct sqlx). Each file starts
//! with its run command; results go to `BENCHMARKS.md` at the workspace root.
