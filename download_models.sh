#!/usr/bin/env bash
# Fetch the released checkpoints and reference statistics into checkpoints/ and fid_stats/.
#
#   bash download_models.sh               # everything in download_manifest.tsv
#   bash download_models.sh --only NAME   # some entries (repeatable; NAME or file name as in the manifest)
#   bash download_models.sh --dry-run     # print every file: source -> destination, expected SHA-256
#
# Downloads resume (hf's own resume; curl -C - for URLs). Every file is checked against the SHA-256 in the
# manifest: a mismatch deletes the file and fails. Where the manifest has no hash yet ('-'), the hash of the first
# download is written into the manifest (trust on first use) and checked from then on.
# NEON_DOWNLOAD_MANIFEST and NEON_DOWNLOAD_ROOT override the manifest and the folder destinations are relative to
# (tests use local ones).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="${NEON_DOWNLOAD_MANIFEST:-$root/download_manifest.tsv}"
dest_root="${NEON_DOWNLOAD_ROOT:-$root}"
dry_run=0
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only) shift; [ $# -gt 0 ] || { echo "download_models.sh: --only needs a NAME" >&2; exit 2; }; only+=("$1") ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "download_models.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -f "$manifest" ] || { echo "download_models.sh: manifest $manifest not found" >&2; exit 2; }

wanted() {  # wanted NAME FILE
  [ ${#only[@]} -eq 0 ] && return 0
  local o
  for o in "${only[@]}"; do [ "$o" = "$1" ] || [ "$o" = "$2" ] && return 0; done
  return 1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

record_hash() {  # record_hash NAME HASH: fill in the manifest's '-' for NAME
  local tmp
  tmp="$(mktemp "$manifest.XXXXXX")"
  awk -F'\t' -v OFS='\t' -v n="$1" -v h="$2" '!/^#/ && $1 == n && $6 == "-" { $6 = h } { print }' "$manifest" > "$tmp"
  mv "$tmp" "$manifest"
}

fetch() {  # fetch KIND SOURCE FILE DEST
  local kind="$1" source="$2" file="$3" dest="$4"
  mkdir -p "$(dirname "$dest")"
  case "$kind" in
    hf)
      command -v hf >/dev/null 2>&1 || { echo "download_models.sh: the 'hf' command is missing: pip install -U huggingface_hub" >&2; exit 1; }
      local dir
      dir="$(dirname "$dest")"
      hf download "$source" "$file" --local-dir "$dir" >/dev/null
      [ "$dir/$file" = "$dest" ] || mv "$dir/$file" "$dest" ;;
    hf-folder)
      command -v hf >/dev/null 2>&1 || { echo "download_models.sh: the 'hf' command is missing: pip install -U huggingface_hub" >&2; exit 1; }
      hf download "$source" config.json "$file" --local-dir "$dest" >/dev/null ;;
    url)
      curl -fL --retry 3 -C - --progress-bar -o "$dest.part" "$source"
      mv "$dest.part" "$dest" ;;
    *) echo "download_models.sh: unknown kind '$kind' in $manifest" >&2; exit 2 ;;
  esac
}

count=0
while IFS=$'\t' read -r name kind source file dest sha; do
  case "$name" in ''|'#'*) continue ;; esac
  wanted "$name" "$file" || continue
  count=$((count + 1))
  target="$dest_root/$dest"
  checked="$target"
  [ "$kind" = "hf-folder" ] && checked="$target/$file"
  where="$source"
  [ "$kind" = "url" ] || where="hf:$source/$file"
  if [ "$dry_run" = 1 ]; then
    if [ "$sha" = "-" ]; then hash_note="sha256 unknown: recorded on first download"; else hash_note="sha256 $sha"; fi
    printf '%-26s %s -> %s  [%s]\n' "$name" "$where" "$dest" "$hash_note"
    continue
  fi
  if [ -f "$checked" ] && { [ "$sha" = "-" ] || [ "$(sha256_of "$checked")" = "$sha" ]; }; then
    echo "✓ $dest"
    [ "$sha" = "-" ] && record_hash "$name" "$(sha256_of "$checked")"
    continue
  fi
  echo "↓ $name: $where -> $dest"
  fetch "$kind" "$source" "$file" "$target"
  got="$(sha256_of "$checked")"
  if [ "$sha" = "-" ]; then
    record_hash "$name" "$got"
    echo "  no published SHA-256 for $name: recorded $got in $(basename "$manifest") (trust on first use)"
  elif [ "$got" != "$sha" ]; then
    rm -rf "$target"
    echo "download_models.sh: SHA-256 mismatch for $dest: expected $sha, got $got (file deleted)" >&2
    exit 1
  else
    echo "  sha256 ok"
  fi
done < "$manifest"

if [ "$count" = 0 ]; then
  echo "download_models.sh: nothing matches --only ${only[*]}" >&2
  exit 2
fi
[ "$dry_run" = 1 ] || echo "done: $count file(s) in checkpoints/ and fid_stats/"
