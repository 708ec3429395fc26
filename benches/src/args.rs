//! The flags the load harnesses share, flattened into each one's `Args` (one definition, one
//! default, one help text, instead of a copy per binary).

// The admin connection and the smoke switch: every harness takes both. (Not a doc comment:
// clap would show a flattened struct's doc as the about text of a harness without its own.)
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Admin connection used only to create, seed, check and drop the benchmark databases;
    /// they are reached with the same user, host and port.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_url: String,
    /// A small, short run that checks the harness works (CI) and measures nothing; what each
    /// harness shrinks is in its `Args::effective`.
    #[arg(long)]
    pub smoke: bool,
}
