#!/usr/bin/env bash
# Builds corral's Debian packages and the apt repository the control plane
# serves at /apt/:
#
#   target/debian/corral_<version>-1_<arch>.deb        the `corral` command (server and CLI)
#   target/debian/corral-agent_<version>-1_<arch>.deb  the node agent, its unit and /etc/corral/agent.conf
#   target/debian/todomvc_<version>-1_<arch>.deb       the workload
#   target/debian/repo/                                 a flat apt repository of the three
#                                                       (+ Debian's consul, which bookworm lacks)
#
# Binaries once (release, or --profile dev), then `cargo deb --no-build` per
# package; a package or index that is newer than everything it is made of is
# left alone, so a second run with nothing changed is quick. Prints the paths of the .debs on
# stdout, progress on stderr. Installs cargo-deb (pinned) and apt-utils if
# missing. Options:
#   --no-consul       leave consul out of the repository
#   --profile dev     package the debug binaries `cargo build --workspace --bins`
#                     leaves (what scripts/test.sh does: a cold release build
#                     costs CI far more than anything else here); same
#                     packages otherwise. Default: release.
set -euo pipefail
cd "$(dirname "$0")/.."

with_consul=1
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --no-consul) with_consul=0 ;;
    --profile) profile=${2:?--profile needs a cargo profile}; shift ;;
    *) echo "package.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$profile" in
  dev | debug) profile=dev; profile_dir=debug ;;
  *) profile_dir=$profile ;;
esac

started=$(date +%s)
step() { printf '==> [%3ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

cargo_deb_version=3.8.0
target_dir=${CARGO_TARGET_DIR:-target}
out="$target_dir/debian"
repo="$out/repo"

if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $cargo_deb_version"; then
  step "installing cargo-deb $cargo_deb_version into ~/.cargo/bin"
  cargo install -q cargo-deb --version "$cargo_deb_version" --locked --force
fi
if ! command -v apt-ftparchive >/dev/null; then
  step "installing apt-utils (apt-ftparchive)"
  if [ "$(id -u)" -ne 0 ]; then
    echo "package.sh: apt-ftparchive is missing; install apt-utils (as root)" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apt-utils >/dev/null
fi

if [ "$profile" = dev ]; then
  # Exactly test.sh's build, so there it is a no-op (a subset of the
  # workspace can resolve other features and rebuild).
  step "dev binaries (cargo build --workspace --bins)"
  cargo build -q --workspace --bins --locked
else
  step "$profile binaries (cargo build --profile $profile -p corral-server -p corral-agent -p todomvc)"
  cargo build -q --profile "$profile" --locked -p corral-server -p corral-agent -p todomvc
fi
mkdir -p "$out"
# Packages of another profile have the same names: start over.
if [ "$(cat "$out/.profile" 2>/dev/null)" != "$profile" ]; then
  rm -f "$out"/*.deb
  echo "$profile" > "$out/.profile"
fi

# crate : crate dir : Debian package : binary
packages=(corral-server:backend:corral:corral
          corral-agent:agents:corral-agent:corral-agent
          todomvc:todomvc:todomvc:todomvc)
# The workspace version (the first `version =` line of Cargo.toml).
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
debs=()
for entry in "${packages[@]}"; do
  IFS=: read -r crate dir name bin <<<"$entry"
  deb="$out/${name}_${version}-1_${arch}.deb"
  debs+=("$deb")
  # Everything the package is made of: the binary, the manifests, the unit
  # and config file (agents/debian), the README (todomvc).
  inputs=("$target_dir/$profile_dir/$bin" "$dir/Cargo.toml" Cargo.toml)
  [ -d "$dir/debian" ] && inputs+=("$dir/debian")
  [ -f "$dir/README.md" ] && inputs+=("$dir/README.md")
  if [ -f "$deb" ] && [ -z "$(find "${inputs[@]}" -newer "$deb" -print -quit)" ]; then
    step "$deb is up to date"
    continue
  fi
  step "packaging $deb"
  # stdout is only the path; warnings (a unit not found...) are shown,
  # except the one about packaging a dev build, which is the point of dev.
  if ! warnings=$(cargo deb --no-build --locked -p "$crate" --profile "$profile" --output "$deb" 2>&1 >/dev/null); then
    echo "$warnings" >&2
    exit 1
  fi
  if [ "$profile" = dev ]; then
    warnings=$(grep -v "dev profile is not supported\|cargo-deb is for making releases\|To enable debug symbols\|Cargo also supports custom" <<<"$warnings" || true)
  fi
  if [ -n "$warnings" ]; then echo "$warnings" >&2; fi
done

step "apt repository in $repo"
mkdir -p "$repo"
# Exactly this build's packages (a version bump leaves no stale ones).
for old in "$repo"/*.deb; do
  [ -e "$old" ] || continue
  case "$(basename "$old")" in
    consul_*) ;;
    *) keep=0
       for deb in "${debs[@]}"; do [ "$(basename "$deb")" = "$(basename "$old")" ] && keep=1; done
       [ "$keep" = 1 ] || rm -f "$old" ;;
  esac
done
for deb in "${debs[@]}"; do
  # cp -p keeps the time stamp; copied aside and renamed in, so a running
  # server never hands out half a package.
  if ! cmp -s "$deb" "$repo/$(basename "$deb")"; then
    cp -p "$deb" "$repo/.$(basename "$deb").part"
    mv "$repo/.$(basename "$deb").part" "$repo/$(basename "$deb")"
  fi
done
if [ "$with_consul" = 1 ] && ! ls "$repo"/consul_*.deb >/dev/null 2>&1; then
  # Bookworm has no consul; scripts/setup.sh adds bullseye's, pinned low.
  # Serving it here lets a node get everything from the control plane.
  if apt-cache show consul >/dev/null 2>&1; then
    step "adding Debian's consul package (apt-get download)"
    (cd "$repo" && apt-get download -qq consul 2>/dev/null) ||
      step "could not download consul; the repository goes without it"
  else
    step "no consul package in this machine's apt sources; the repository goes without it"
  fi
fi
if [ -f "$repo/Release" ] && [ -z "$(find "$repo" -name '*.deb' -newer "$repo/Release" -print -quit)" ] &&
   [ "$(find "$repo" -name '*.deb' | wc -l)" = "$(grep -c '^Package:' "$repo/Packages" 2>/dev/null)" ]; then
  step "index up to date"
else
  step "indexing (apt-ftparchive packages, release)"
  # Built beside the repository and renamed in: the server never serves a
  # half-written index.
  tmp=$(mktemp -d "$out/.index.XXXXXX")
  release=$(mktemp "$out/.Release.XXXXXX")
  trap 'rm -rf "$tmp" "$release"' EXIT
  (cd "$repo" && apt-ftparchive -q packages .) > "$tmp/Packages"
  gzip -9n < "$tmp/Packages" > "$tmp/Packages.gz"
  # Release, made where only the two indexes are, names their hashes.
  (cd "$tmp" && apt-ftparchive -q \
     -o APT::FTPArchive::Release::Origin=corral \
     -o APT::FTPArchive::Release::Label=corral \
     -o APT::FTPArchive::Release::Suite=stable \
     -o APT::FTPArchive::Release::Architectures="$arch all" \
     -o APT::FTPArchive::Release::Description="corral's packages (unsigned)" \
     release .) > "$release"
  mv "$tmp/Packages" "$tmp/Packages.gz" "$repo/"
  # Release last: it names the others' hashes, so whoever sees it finds them.
  chmod 644 "$release"
  mv "$release" "$repo/Release"
fi

step "done"
for deb in "${debs[@]}"; do
  echo "$deb"
done
