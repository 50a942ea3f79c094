#!/usr/bin/env bash
# Fetch the released checkpoints and reference statistics into checkpoints/ and fid_stats/.
#
#   bash download_models.sh               # everything in download_manifest.tsv
#   bash download_models.sh --only NAME   # some entries (repeatable; NAME or file name as in the manifest)
#   bash download_models.sh --dry-run     # print every file: source -> destination, expected SHA-256, size
#
# Every file is checked against the SHA-256 in the manifest. Where the manifest has no hash yet ('-'), the hash
# (and size) of the first download is written into the manifest (trust on first use) and checked from then on.
# A download goes to a temporary name beside its destination and is moved into place only once verified; an
# existing file that does not verify is left as it is (move it away to fetch it again), and nothing this run
# did not create is deleted. URL downloads resume from their .part file.
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
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "download_models.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -f "$manifest" ] || { echo "download_models.sh: manifest $manifest not found" >&2; exit 2; }

die() { echo "download_models.sh: $*" >&2; exit "${status:-1}"; }

wanted() {  # wanted NAME FILE
  [ ${#only[@]} -eq 0 ] && return 0
  local o
  for o in "${only[@]}"; do [ "$o" = "$1" ] || [ "$o" = "$2" ] && return 0; done
  return 1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

human() {  # human BYTES: 1.2 GB
  awk -v b="$1" 'BEGIN { split("B KB MB GB TB", u); i = 1; while (b >= 1000 && i < 5) { b /= 1000; i++ }
                         printf(i == 1 ? "%d %s" : "%.1f %s", b, u[i]) }'
}

check_relative() {  # check_relative NAME FIELD PATH: a plain relative path inside its root
  local name="$1" field="$2" path="$3" part
  case "$path" in
    ''|/*) status=2 die "$name: $field '$path' must be a relative path inside $dest_root" ;;
  esac
  IFS=/ read -r -a parts <<< "$path"
  for part in "${parts[@]}"; do
    case "$part" in ''|.|..) status=2 die "$name: $field '$path' has an empty, '.' or '..' component" ;; esac
  done
}

check_source() {  # check_source NAME KIND SOURCE: an https URL, or a plain Hub repo id (never an option)
  local name="$1" kind="$2" source="$3" part='[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?'
  case "$kind" in
    url) [[ "$source" =~ ^https://[^[:space:][:cntrl:]]+$ ]] ||
           status=2 die "$name: source '$source' must be an https:// URL without spaces or control characters" ;;
    hf|hf-folder) [[ "$source" =~ ^$part/$part$ && "$source" != *..* && "$source" != *--* ]] ||
           status=2 die "$name: source '$source' must be a Hub repo id such as owner/name" ;;
    *) status=2 die "$name: unknown kind '$kind'" ;;
  esac
}

check_fields() {  # check_fields NAME FILE SHA SIZE: a file name that cannot pass for an option, a hash, a size
  local name="$1" file="$2" sha="$3" size="$4"
  [[ "$file" =~ ^[A-Za-z0-9_][A-Za-z0-9_./+=@-]*$ || "$file" = - ]] ||
    status=2 die "$name: file '$file' must be a plain path inside the repo"
  [[ "$sha" =~ ^[0-9a-f]{64}$ || "$sha" = - ]] || status=2 die "$name: sha256 '$sha' is neither 64 hex digits nor -"
  [[ "$size" =~ ^[0-9]+$ || "$size" = - ]] || status=2 die "$name: size '$size' is neither a number nor -"
}

check_row() {  # check_row NAME KIND SOURCE FILE DEST SHA SIZE: every field, before anything is fetched
  check_source "$1" "$2" "$3"
  check_fields "$1" "$4" "$6" "$7"
  check_relative "$1" dest "$5"
  [ "$2" = url ] || check_relative "$1" file "$4"
}

check_no_symlink() {  # check_no_symlink NAME DEST: no component of dest_root/DEST is a symbolic link
  local name="$1" path="$dest_root" part
  IFS=/ read -r -a parts <<< "$2"
  for part in "${parts[@]}"; do
    path="$path/$part"
    [ -L "$path" ] && status=2 die "$name: $path is a symbolic link; refusing to write through it"
  done
  return 0
}

record() {  # record NAME HASH SIZE: fill in the manifest's '-' hash (and size) for NAME, keeping its mode
  local tmp
  tmp="$(mktemp "$manifest.XXXXXX")"
  chmod "$(stat -c %a "$manifest")" "$tmp"
  awk -F'\t' -v OFS='\t' -v n="$1" -v h="$2" -v s="$3" \
    '!/^#/ && $1 == n && $6 == "-" { $6 = h; if ($7 == "" || $7 == "-") $7 = s } { print }' "$manifest" > "$tmp"
  mv "$tmp" "$manifest"
}

staging=""
cleanup() { [ -z "$staging" ] || rm -rf -- "$staging"; }  # only ever a folder this run created
trap cleanup EXIT

hf_command() {  # the project's own .venv/bin/hf first, else one on PATH
  if [ -x "$root/.venv/bin/hf" ]; then echo "$root/.venv/bin/hf"
  elif command -v hf >/dev/null 2>&1; then command -v hf
  else die "the 'hf' command is missing: .venv/bin/pip install -U huggingface_hub"
  fi
}

# Manifest fields go after `--`, so that no value can be read as an option of hf or curl.
fetch() {  # fetch NAME KIND SOURCE FILE DEST TARGET: sets `fetched`, the downloaded (unverified) file or folder
  local name="$1" kind="$2" source="$3" file="$4" dest="$5" target="$6" hf=""
  if [ "$kind" != url ]; then hf="$(hf_command)" || exit; fi  # before anything is made
  mkdir -p "$(dirname "$target")"
  case "$kind" in
    hf|hf-folder)
      staging="$(mktemp -d "$(dirname "$target")/.$(basename "$target").download.XXXXXX")"
      if [ "$kind" = hf ]; then
        "$hf" download --local-dir "$staging" -- "$source" "$file" >/dev/null || failed "$name" "$dest"
        fetched="$staging/$file"
      elif [ "$file" = "${file#*/}" ]; then  # one model: its config and weights
        "$hf" download --local-dir "$staging/folder" -- "$source" config.json "$file" >/dev/null ||
          failed "$name" "$dest"
        rm -rf -- "$staging/folder/.cache"
        fetched="$staging/folder"
      else  # a pipeline (FILE inside a component): every config and safetensors file, no pickles
        "$hf" download --include '*.json' --include '*.safetensors' --local-dir "$staging/folder" -- "$source" \
          >/dev/null || failed "$name" "$dest"
        rm -rf -- "$staging/folder/.cache"
        fetched="$staging/folder"
      fi ;;
    url)
      [ -L "$target.part" ] && status=2 die "$target.part is a symbolic link; refusing to write through it"
      curl -fL --proto =https --proto-redir =https --retry 3 -C - --progress-bar -o "$target.part" -- "$source" ||
        failed "$name" "$dest" "$target.part"
      fetched="$target.part" ;;
    *) status=2 die "unknown kind '$kind' in $manifest" ;;
  esac
}

failed() {  # failed NAME DEST [PART]: the download tool has said why; say which entry it was
  local resume=""
  [ -z "${3:-}" ] || [ ! -e "$3" ] || resume="; rerun to resume from $3"
  die "$1: downloading $2 failed$resume"
}

# Every row is checked before anything is fetched.
while IFS=$'\t' read -r name kind source file dest sha size; do
  case "$name" in ''|'#'*) continue ;; esac
  check_row "$name" "$kind" "$source" "$file" "$dest" "$sha" "${size:--}"
done < "$manifest"

count=0
while IFS=$'\t' read -r name kind source file dest sha size; do
  case "$name" in ''|'#'*) continue ;; esac
  wanted "$name" "$file" || continue
  count=$((count + 1))
  size="${size:--}"
  target="$dest_root/$dest"
  inner=""
  [ "$kind" = "hf-folder" ] && inner="/$file"
  where="$source"
  [ "$kind" = "url" ] || where="hf:$source/$file"
  if [ "$dry_run" = 1 ]; then
    if [ "$sha" = "-" ]; then hash_note="sha256 unknown: recorded on first download"; else hash_note="sha256 $sha"; fi
    if [ "$size" != "-" ]; then size_note="$(human "$size")"; else size_note="size unknown"; fi
    [ -e "$target$inner" ] && size_note="$size_note, present: $(human "$(size_of "$target$inner")")"
    printf '%-26s %s -> %s  [%s, %s]\n' "$name" "$where" "$dest" "$hash_note" "$size_note"
    continue
  fi
  check_no_symlink "$name" "$dest$inner"
  if [ -e "$target" ]; then
    [ -f "$target$inner" ] || die "$dest exists but holds no $file; move it away to download it again"
    got="$(sha256_of "$target$inner")"
    if [ "$sha" = "-" ]; then
      record "$name" "$got" "$(size_of "$target$inner")"
      echo "✓ $dest (already present: recorded its SHA-256 $got, trust on first use)"
    elif [ "$got" = "$sha" ]; then
      echo "✓ $dest"
    else
      die "$dest exists and does not match the manifest (SHA-256 $got, expected $sha); left as it is: move it away to download it again"
    fi
    continue
  fi
  echo "↓ $name: $where -> $dest"
  fetch "$name" "$kind" "$source" "$file" "$dest" "$target"
  got="$(sha256_of "$fetched$inner")"
  if [ "$sha" != "-" ] && [ "$got" != "$sha" ]; then
    rm -rf -- "$fetched"  # this run's download, never the destination
    die "SHA-256 mismatch for $dest: expected $sha, got $got (download deleted)"
  fi
  if [ "$sha" = "-" ]; then
    record "$name" "$got" "$(size_of "$fetched$inner")"
    echo "  no published SHA-256 for $name: recorded $got in $(basename "$manifest") (trust on first use)"
  else
    echo "  sha256 ok"
  fi
  mv -T -n -- "$fetched" "$target"
  [ -e "$fetched" ] && die "$dest appeared while downloading; left as it is, the download is at $fetched"
  cleanup; staging=""
done < "$manifest"

if [ "$count" = 0 ]; then
  status=2 die "nothing matches --only ${only[*]}"
fi
[ "$dry_run" = 1 ] || echo "done: $count file(s) in checkpoints/ and fid_stats/"
