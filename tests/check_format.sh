#!/usr/bin/env bash
# Checks that msb's C++ follows .clang-format. Run by CTest:
#
#   tests/check_format.sh CLANG_FORMAT SOURCE_DIR
#
# The files are git's (tracked, and untracked ones not ignored) in a checkout, else every .cpp and
# .h under SOURCE_DIR; either way not those inside a build folder (one holding CMakeCache.txt,
# whatever its name). It fails without clang-format, and when it finds no files at all or misses
# cli/main.cpp, so that it cannot pass by checking nothing.
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 CLANG_FORMAT SOURCE_DIR" >&2
  exit 2
fi
clang_format=$1
src=$2
if ! command -v "$clang_format" >/dev/null; then
  echo "clang-format not found ($clang_format): scripts/setup installs it (Debian package clang-format)"
  exit 1
fi
cd "$src"

# True where PATH (relative) lies inside a build folder.
in_build_folder() {
  local dir
  dir=$(dirname "$1")
  while [[ $dir != . && $dir != / ]]; do
    [[ -e $dir/CMakeCache.txt ]] && return 0
    dir=$(dirname "$dir")
  done
  return 1
}

files=()
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  while IFS= read -r f; do
    [[ -f $f ]] && ! in_build_folder "$f" && files+=("$f")
  done < <(git ls-files -co --exclude-standard -- '*.cpp' '*.h')
else
  while IFS= read -r f; do
    files+=("${f#./}")
  done < <(find . \( -name .git -o -type d -exec test -e '{}/CMakeCache.txt' \; \) -prune -o \
    -type f \( -name '*.cpp' -o -name '*.h' \) -print)
fi
if ! printf '%s\n' "${files[@]}" | grep -qx 'cli/main.cpp'; then
  echo "found ${#files[@]} files to check, and not cli/main.cpp: is $src msb's source folder?"
  exit 1
fi
echo "checking ${#files[@]} files with $clang_format"
"$clang_format" --dry-run --Werror "${files[@]}"
