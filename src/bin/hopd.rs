//! hopd: the hop connection gateway. See `hopd --help` and README.md.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hop_gateway::main()
}
