#!/usr/bin/env bash
# On a lent GPU machine (no package index): install carried wheels that the machine lacks or
# has at another version, into /tmp/site (then: export PYTHONPATH=/tmp/site).
#   bash benchmarks/device_install.sh .whl1 [.whl2 ...]
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
wanted=()
for dir in "$@"; do
  for wheel in "$dir"/*.whl; do
    name=$(basename "$wheel"); dist=${name%%-*}; version=$(echo "$name" | cut -d- -f2)
    have=$(python3 -m pip show "$dist" 2>/dev/null | awk "/^Version:/ {print \$2}" || true)
    if [ "$have" != "$version" ]; then wanted+=("$wheel"); echo "install $dist $version (have: ${have:-none})"; fi
  done
done
if [ ${#wanted[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
    --target /tmp/site "${wanted[@]}"
fi
