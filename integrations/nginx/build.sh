#!/usr/bin/env bash
# Builds the XO handoff module (ngx_http_handoff_module.so) out of tree against Debian's
# nginx-dev, with nginx's own configure flags (conf_flags: --with-compat etc.), otherwise nginx
# refuses the module as "not binary compatible". Rebuilds only when a source file or the
# installed nginx version changed.
#   integrations/nginx/build.sh            build into build/nginx/ (prints the .so path)
#   XO_NGINX_BUILD=/tmp/x integrations/nginx/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${XO_NGINX_BUILD:-$repo/build/nginx}
nginx_src=/usr/share/nginx/src
module=$build/objs/ngx_http_handoff_module.so

if [ ! -f "$nginx_src/conf_flags" ]; then
  echo "build.sh: $nginx_src/conf_flags missing: install Debian's nginx-dev" >&2
  exit 1
fi

version=$(nginx -v 2>&1)
stamp=$( { echo "$version"; cat "$here"/config "$here"/*.c "$here"/*.h "$0"; } | sha256sum | cut -c1-16)
if [ -f "$module" ] && [ "$(cat "$build/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$module"
  exit 0
fi

mkdir -p "$build"
# configure writes a Makefile into its working directory: work on a copy, never in /usr/share.
rm -rf "$build/src"
cp -a "$nginx_src" "$build/src"
(
  cd "$build/src"
  # shellcheck disable=SC1091
  . ./conf_flags
  ./configure "${NGX_CONF_FLAGS[@]}" --with-cc-opt='-O2 -g -Wall -Werror -fPIC' \
    --add-dynamic-module="$here" --builddir="$build/objs" >"$build/configure.log" 2>&1 \
    || { tail -n 30 "$build/configure.log" >&2; exit 1; }
  make -f "$build/objs/Makefile" modules >"$build/make.log" 2>&1 \
    || { grep -E 'error|warning' "$build/make.log" | head -n 40 >&2; exit 1; }
)
echo "$stamp" >"$build/stamp"
echo "$module"
