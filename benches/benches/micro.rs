//! Criterion micro-benchmarks: see the real set below.
fn main() {}
