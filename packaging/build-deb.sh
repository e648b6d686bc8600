#!/bin/sh
# Build the Debian package of the agent: dist/ironfleet-agent_<version>_<arch>.deb.
#
#   packaging/build-deb.sh                 # the version in pyproject.toml
#   VERSION=0.2.0 packaging/build-deb.sh   # another version (upgrade tests, hotfixes)
#
# PYTHON (default .venv/bin/python) installs the agent and its runtime dependencies into
# /opt/ironfleet/lib of the package, at the versions installed in PYTHON's environment
# (the ones the tests ran with). The package runs them with the target's /usr/bin/pythonX.Y
# of the same X.Y, and its compiled dependencies are built for this machine's
# architecture: build on the distribution and architecture of the vehicles
# (docs/install.md). Every file is dpkg's: no pip and no network at install time.
set -eu
umask 022  # the package's files are world-readable whatever the caller's umask

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
PYTHON=${PYTHON:-$root/.venv/bin/python}
OUT=${OUT:-$root/dist}
PREFIX=/opt/ironfleet/lib

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "IronFleet needs Python >= 3.11")'
arch=$(dpkg --print-architecture)

work=$(mktemp -d "${TMPDIR:-/tmp}/ironfleet-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
src=$work/src
stage=$work/stage
mkdir -p "$src" "$stage"

# A clean copy of the sources: nothing from the working tree's build/ or egg-info leaks
# in, and the tree itself is left untouched.
(cd "$root" && tar -cf - --exclude=__pycache__ pyproject.toml README.md agent firmware_bridge fleet) |
  (cd "$src" && tar -xf -)
if [ -n "${VERSION:-}" ]; then
  sed -i "s/^version = \".*\"/version = \"$VERSION\"/" "$src/pyproject.toml"
fi
version=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
# PEP 440 pre-releases (1.0rc1, 1.0.dev2) sort before the release; in Debian that is "~".
debversion=$(printf '%s\n' "$version" | sed -E 's/(a|b|rc|\.dev)([0-9]+)$/~\1\2/')

echo "building ironfleet-agent $debversion ($arch, python$pyver)"
# Dependencies pinned to PYTHON's environment; the agent itself comes from $src.
"$PYTHON" -m pip freeze --exclude-editable >"$work/freeze.txt"
grep -iv '^ironfleet[-_]agent[ =@]' "$work/freeze.txt" >"$work/constraints.txt" || true
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --no-compile --target "$stage$PREFIX" --constraint "$work/constraints.txt" "$src"
rm -rf "$stage$PREFIX/bin"  # pip's scripts name PYTHON; the package has its own below
chmod -R a+rX,go-w "$stage$PREFIX"

# Entry points: the package's console_scripts as small scripts in /usr/bin that run the
# target's interpreter isolated (-I: no environment, user site or script directory;
# -S: not Debian's dist-packages) on the standard library plus /opt/ironfleet/lib.
mkdir -p "$stage/usr/bin"
"$PYTHON" - "$stage" "$PREFIX" "$pyver" <<'EOF'
import configparser, glob, os, sys

stage, prefix, pyver = sys.argv[1:]
(entry_points,) = glob.glob(f"{stage}{prefix}/ironfleet_agent-*.dist-info/entry_points.txt")
scripts = configparser.ConfigParser(delimiters=("=",))
scripts.optionxform = str  # script names as written
scripts.read(entry_points)
for name, target in scripts["console_scripts"].items():
    module, func = (part.strip() for part in target.split(":"))
    path = f"{stage}/usr/bin/{name}"
    with open(path, "w") as f:
        f.write(
            f"#!/usr/bin/python{pyver} -IS\n"
            "# ironfleet-agent package (packaging/build-deb.sh): runs the agent's code in\n"
            f"# {prefix} with this interpreter's standard library, nothing else.\n"
            "import site\n"
            "import sys\n\n"
            f"site.addsitedir({prefix!r})\n"
            f"from {module} import {func}\n\n"
            f"sys.exit({func}())\n"
        )
    os.chmod(path, 0o755)
    print(f"  /usr/bin/{name} -> {module}:{func}")
EOF

# Byte-code compiled now, with the installed paths: the agent runs under
# ProtectSystem=strict and could not write it, and dpkg then owns every file.
"$PYTHON" -m compileall -q -j 0 -s "$stage" -p / "$stage$PREFIX" >/dev/null

# systemd, the user, the configuration and the examples.
install -D -m 0644 "$root/systemd/ironfleet-agent.service" "$stage/lib/systemd/system/ironfleet-agent.service"
install -D -m 0644 "$root/systemd/ironfleet.sysusers.conf" "$stage/usr/lib/sysusers.d/ironfleet.conf"
install -d -m 0750 "$stage/etc/ironfleet"
install -m 0644 "$root/systemd/agent.toml.example" "$stage/etc/ironfleet/agent.toml"
doc=$stage/usr/share/doc/ironfleet-agent
install -D -m 0644 "$root/systemd/99-ironfleet.rules" "$doc/examples/99-ironfleet.rules"
install -m 0644 "$root/systemd/mosquitto-acl.example" "$doc/examples/mosquitto-acl.example"
install -m 0644 "$root/systemd/agent.toml.example" "$doc/examples/agent.toml.example"
install -m 0644 "$root/docs/install.md" "$doc/install.md"
# Bash completion for the technician CLI, from click, generated with the staged code.
install -d "$stage/usr/share/bash-completion/completions"
_IRONFLEET_COMPLETE=bash_source PYTHONPATH="$stage$PREFIX" "$PYTHON" -I -c \
  'import sys; sys.argv[0] = "ironfleet"; from agent.cli import main; main()' \
  >"$stage/usr/share/bash-completion/completions/ironfleet"
grep -q "_ironfleet_completion ironfleet" "$stage/usr/share/bash-completion/completions/ironfleet"
install -m 0644 "$here/copyright" "$doc/copyright"

# Control files.
mkdir -p "$stage/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$here/deb/$script" "$stage/DEBIAN/$script"
done
echo /etc/ironfleet/agent.toml >"$stage/DEBIAN/conffiles"
(cd "$stage" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' |
  sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: ironfleet-agent
Version: $debversion
Architecture: $arch
Maintainer: IronFleet <ironfleet@example.invalid>
Installed-Size: $size
Depends: python$pyver, systemd
Section: misc
Priority: optional
Homepage: https://example.invalid/ironfleet
Description: IronFleet edge agent for convoy vehicles
 Reads telemetry from onboard controllers over a serial line, buffers every event
 durably in SQLite before acknowledging it, and uplinks to the fleet over MQTT with
 replay after link loss. Ships the daemon (ironfleet-agent), the technician CLI
 (ironfleet), the reference collector and the controller simulator, with their
 Python dependencies in /opt/ironfleet/lib. The service is installed but neither
 enabled nor started: see /usr/share/doc/ironfleet-agent/install.md.
EOF

mkdir -p "$OUT"
deb=$OUT/ironfleet-agent_${debversion}_$arch.deb
# zstd (dpkg >= 1.21.18; bookworm has 1.21.22): 11.6 MB in 0.2 s, against gzip 12.3 MB in
# 5.2 s and xz 8.6 MB in 10.2 s (the package's 45 MB of files then, on 2 cores).
dpkg-deb --root-owner-group -Zzstd --build "$stage" "$deb" >/dev/null
echo "$deb"
