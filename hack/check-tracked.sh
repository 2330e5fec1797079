#!/usr/bin/env bash
# Fails when git tracks a binary file outside a testdata directory (build
# outputs belong in bin/, which .gitignore covers) or a file over 1 MiB.
# Charts under docs/ are the one kind of binary the repository keeps.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
while IFS= read -r -d '' f; do
	case "$f" in
	*/testdata/* | testdata/*) continue ;;
	docs/*.png | docs/*/*.png | docs/*.svg | docs/*/*.svg) continue ;;
	esac
	[ -f "$f" ] || continue
	# git's own test for binary content: numstat prints "-" for binaries.
	stat_line=$(git diff --no-index --numstat /dev/null "$f" 2>/dev/null || true)
	if [ "${stat_line:0:1}" = "-" ]; then
		echo "check-tracked: $f is a binary file outside testdata/" >&2
		bad=1
	fi
	if [ "$(stat -c %s "$f")" -gt 1048576 ]; then
		echo "check-tracked: $f is larger than 1 MiB" >&2
		bad=1
	fi
done < <(git ls-files -z)
exit "$bad"
