#!/usr/bin/env bash
# The whole test suite: the C++ core under ctest (plain, ThreadSanitizer,
# AddressSanitizer+UBSan), then the Python suite against the installed
# package. Installs the system packages it needs (GoogleTest) when missing.
# Any failure, any sanitizer report and "no tests collected" fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -e /usr/include/gtest/gtest.h ] || ! ls /usr/lib/*/libgtest.a /usr/lib/libgtest.a >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq googletest libgtest-dev >/dev/null
fi

jobs=$(nproc)
for sanitizer in none thread address; do
  dir="build/ctest-$sanitizer"
  flag=""
  [ "$sanitizer" = none ] || flag="-DBATCHSERVE_SANITIZER=$sanitizer"
  echo "== C++ tests ($sanitizer) =="
  cmake -S . -B "$dir" -DBATCHSERVE_BUILD_PYTHON=OFF -DBATCHSERVE_BUILD_TESTS=ON $flag >/dev/null
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" --output-on-failure --no-tests=error -j "$jobs"
done

echo "== Python tests =="
python -m pytest tests -p no:cacheprovider
