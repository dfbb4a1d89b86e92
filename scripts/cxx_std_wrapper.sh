#!/usr/bin/env bash
# Horovod 0.28.1's CMake pins -std=c++14 (and nvcc/torch flags may add c++17), but torch >= 2.14
# headers need C++20. This wrapper, named by CXX during the horovod build, rewrites the standard
# flag and hands everything else to the real compiler (LOFT_REAL_CXX, default g++).
args=()
for a in "$@"; do
  case "$a" in
    -std=c++11|-std=c++14|-std=c++17|-std=gnu++11|-std=gnu++14|-std=gnu++17) args+=("-std=c++20") ;;
    *) args+=("$a") ;;
  esac
done
exec "${LOFT_REAL_CXX:-g++}" "${args[@]}"
