# Sourced by the bench scripts: the repository root, the shared build cache, the local
# stack, a release toolrank in $BIN, and a scratch directory $WORK removed on exit.
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/toolrank/target}"
eval "$(infra/local/up)"
cargo build --release --locked --bin toolrank >&2
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
