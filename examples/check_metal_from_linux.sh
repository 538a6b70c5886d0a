#!/usr/bin/env bash
# Checks, from Linux and without a Mac, that tuneforge compiles for Apple GPUs:
# `cargo clippy --features metal` for aarch64-apple-darwin, lints as errors.
# Nothing is linked or run. The C inside two dependencies (ring, onig) is
# compiled with zig's clang, which carries macOS's libc headers; zig comes from
# PyPI (the `ziglang` wheel) into .zig/.
#
#   bash examples/check_metal_from_linux.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add aarch64-apple-darwin
zig_dir="$(pwd)/.zig"
[ -x "$zig_dir/ziglang/zig" ] || python3 -m pip install -q --target "$zig_dir" ziglang
# cc-rs passes Apple clang's -arch and deployment-target flags; zig takes the target instead.
for tool in cc c++; do
  cat >"$zig_dir/$tool-macos" <<SH
#!/usr/bin/env bash
args=(); skip=0
for a in "\$@"; do
  if [ \$skip = 1 ]; then skip=0; continue; fi
  case "\$a" in -arch) skip=1 ;; -mmacosx-version-min=*|-gfull|--target=*) ;; *) args+=("\$a") ;; esac
done
exec "$zig_dir/ziglang/zig" $tool -target aarch64-macos "\${args[@]}"
SH
  chmod +x "$zig_dir/$tool-macos"
done
export CC_aarch64_apple_darwin="$zig_dir/cc-macos" CXX_aarch64_apple_darwin="$zig_dir/c++-macos"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/metal}"
cargo clippy --target aarch64-apple-darwin --features metal --all-targets -- -D warnings
echo "tuneforge --features metal compiles for aarch64-apple-darwin"
