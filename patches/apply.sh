#!/usr/bin/env bash
# Apply instella-megatron's patch series (patches/[0-9]*.patch, in order) to a Megatron-LM checkout.
#   patches/apply.sh MEGATRON_LM_DIR
# The series is written for Megatron-LM tag core_v0.16.1 (whose megatron/core is the megatron-core
# 0.16.1 wheel). Checks the tag first (a git checkout: HEAD must be the tag's commit; a copy without
# .git: megatron/core/package_info.py must say 0.16.1), then applies each patch that is not applied
# yet. Running it again changes nothing and says so. Exit status 0 on success, 1 on any error, with
# the reason and the fix on stderr; nothing is changed when a check fails.
set -euo pipefail

EXPECTED_TAG=core_v0.16.1
EXPECTED_CORE_VERSION=0.16.1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "apply.sh: error: $*" >&2
  exit 1
}

[[ $# -eq 1 ]] || die "usage: patches/apply.sh MEGATRON_LM_DIR (a Megatron-LM checkout at tag $EXPECTED_TAG)"
DIR=$1
[[ -d $DIR ]] || die "$DIR is not a directory; pass a Megatron-LM checkout at tag $EXPECTED_TAG"
DIR=$(cd "$DIR" && pwd)
[[ -f $DIR/pretrain_gpt.py && -d $DIR/megatron ]] ||
  die "$DIR does not look like Megatron-LM (no pretrain_gpt.py and megatron/); pass a checkout at tag $EXPECTED_TAG"
command -v git >/dev/null || die "git is needed (git apply applies the series, also outside a repository)"

is_own_repo() {
  local top
  top=$(git -C "$DIR" rev-parse --show-toplevel 2>/dev/null) || return 1
  [[ $(cd "$top" && pwd) == "$DIR" ]]
}

check_version() {
  if is_own_repo; then
    local head tagged where
    head=$(git -C "$DIR" rev-parse HEAD)
    where=$(git -C "$DIR" describe --tags --always HEAD 2>/dev/null || echo "$head")
    tagged=$(git -C "$DIR" rev-parse -q --verify "refs/tags/$EXPECTED_TAG^{commit}") ||
      die "Megatron-LM in $DIR is at $where and has no tag $EXPECTED_TAG; the series is written for" \
          "$EXPECTED_TAG: git -C $DIR fetch --tags && git -C $DIR checkout $EXPECTED_TAG"
    [[ $head == "$tagged" ]] ||
      die "Megatron-LM in $DIR is at $where, not at tag $EXPECTED_TAG; the series is written for" \
          "$EXPECTED_TAG: git -C $DIR checkout $EXPECTED_TAG"
    echo "Megatron-LM in $DIR is at tag $EXPECTED_TAG ($head)"
  else
    local info=$DIR/megatron/core/package_info.py version
    [[ -f $info ]] || die "$DIR is not a git checkout and has no megatron/core/package_info.py to tell its" \
                          "version; use a git checkout at tag $EXPECTED_TAG"
    version=$(sed -n -E 's/^(MAJOR|MINOR|PATCH) *= *([0-9]+).*/\2/p' "$info" | paste -sd. -)
    [[ $version == "$EXPECTED_CORE_VERSION" ]] ||
      die "Megatron-LM in $DIR has megatron-core $version, not tag $EXPECTED_TAG ($EXPECTED_CORE_VERSION);" \
          "use a checkout at tag $EXPECTED_TAG"
    echo "Megatron-LM in $DIR (no .git) has megatron-core $version: taken as tag $EXPECTED_TAG"
  fi
}

check_version
shopt -s nullglob
SERIES=("$HERE"/[0-9]*.patch)
[[ ${#SERIES[@]} -gt 0 ]] || die "no patches in $HERE"

# git apply works on the files below its root; the ceiling keeps it from adopting a repository
# that merely contains the tree (a vendored copy), which would make it skip every path.
in_tree() {  # in_tree ROOT git-apply-args...
  local root=$1
  shift
  GIT_CEILING_DIRECTORIES=$(dirname "$root") git -C "$root" apply "$@"
}

# run_series ROOT: apply, in order, every patch not yet applied under ROOT; say what happened.
# Sets APPLIED (patches applied now) or, on a patch that neither applies nor is applied, FAILED.
run_series() {
  local root=$1 patch name
  APPLIED=0
  FAILED=
  for patch in "${SERIES[@]}"; do
    name=$(basename "$patch")
    if in_tree "$root" --check --reverse "$patch" 2>/dev/null; then
      echo "already applied: $name"
      continue
    fi
    if ! in_tree "$root" --check "$patch" 2>/dev/null; then
      FAILED=$name
      return 1
    fi
    in_tree "$root" "$patch"
    while IFS=$'\t' read -r added removed file; do
      echo "applied $name: $file (+$added -$removed)"
    done < <(git apply --numstat "$patch")
    APPLIED=$((APPLIED + 1))
  done
}

# Rehearse on a scratch copy of the files the series touches, so a failure changes nothing.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mapfile -t FILES < <(for patch in "${SERIES[@]}"; do git apply --numstat "$patch" | cut -f3; done | sort -u)
for file in "${FILES[@]}"; do
  [[ -f $DIR/$file ]] || die "$DIR/$file is missing; the series patches it (tag $EXPECTED_TAG has it)"
  mkdir -p "$SCRATCH/$(dirname "$file")"
  cp "$DIR/$file" "$SCRATCH/$file"
done
if ! run_series "$SCRATCH" >/dev/null; then
  die "$FAILED neither applies to $DIR nor is applied there: the files it patches (${FILES[*]}) differ from tag" \
      "$EXPECTED_TAG plus the series; restore them (git -C $DIR checkout -- ${FILES[*]}) and run again"
fi

run_series "$DIR"
if [[ $APPLIED -eq 0 ]]; then
  echo "nothing changed: Megatron-LM in $DIR already has all ${#SERIES[@]} patches"
else
  echo "changed Megatron-LM in $DIR: applied $APPLIED of ${#SERIES[@]} patches (the run-time patches are" \
       "applied by instella_plugin.upstream when --plugin is given; see patches/README.md)"
fi
