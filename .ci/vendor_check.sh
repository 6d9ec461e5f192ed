#!/usr/bin/env bash
# vendor/sqlx-core must be the published sqlx-core plus vendor/sqlx-core.patch
# and nothing else: the vendored tree is only a carrier for that one fix
# (docs/decisions.md, record 13). The published crate's Cargo.lock is left
# out of the vendored copy (cargo ignores a path dependency's lock file).
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.9.0
# sha256 of the .crate, as crates.io's index records it.
sha256=05b44e85bf579a8eeb4ceaa77a3a523baf2bf0e9bac7e40f405d537b5d2d5ccb

grep -q "^version = \"$version\"" vendor/sqlx-core/Cargo.toml ||
  { echo "vendor/sqlx-core is not sqlx-core $version: update this check with it" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
crate="$work/sqlx-core-$version.crate"
curl -sSfL --retry 3 -o "$crate" "https://static.crates.io/crates/sqlx-core/sqlx-core-$version.crate"
echo "$sha256  $crate" | sha256sum --check --quiet
tar -xzf "$crate" -C "$work"
published="$work/sqlx-core-$version"
rm "$published/Cargo.lock"
patch --quiet --directory "$published" -p1 < vendor/sqlx-core.patch
if ! diff -r "$published" vendor/sqlx-core; then
  echo "vendor/sqlx-core differs from sqlx-core $version + vendor/sqlx-core.patch" >&2
  exit 1
fi
echo "vendor/sqlx-core is sqlx-core $version plus vendor/sqlx-core.patch"
