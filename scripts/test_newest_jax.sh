#!/usr/bin/env bash
# The newest JAX line, as a GPU user installs it: a wheel built from this checkout, installed (not
# editable) with the test and gpu extras into a fresh Python 3.12+ venv with the newest JAX; the
# installed `jax-eplb` runs the synthetic demo and writes a Hugging Face checkpoint from another
# folder; then the whole test suite runs against the installed package.
#   scripts/test_newest_jax.sh            # picks Python 3.12, else 3.13 (PATH, then pyenv)
#   PYTHON=/path/to/python3.12 scripts/test_newest_jax.sh
# Without any Python 3.12+ it prints a notice and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

python_312_plus() {
    local candidate version
    for candidate in "${PYTHON:-}" python3.12 python3.13 \
        $( (command -v pyenv >/dev/null && pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.[0-9]+)?$' \
            | sort -V | sed "s|^|$(pyenv root 2>/dev/null)/versions/|; s|$|/bin/python|") || true); do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
        version="$("$candidate" -c 'import sys; print("%d%02d" % sys.version_info[:2])' 2>/dev/null)" || continue
        if [ "$version" -ge 312 ]; then echo "$candidate"; return 0; fi
    done
    return 1
}

if ! python="$(python_312_plus)"; then
    echo "notice: no Python 3.12+ on this machine: the newest-JAX line (JAX >= 0.11 needs Python >= 3.12) is skipped"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== newest JAX line: $("$python" --version) in a fresh venv, jax-eplb installed from a wheel"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
# The wheel is built from a copy of the checkout's files (tracked, and untracked but not ignored), so the
# build leaves nothing in the checkout and does not race an editable install running there.
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --) | tar -xf - -C "$work/src"
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/jax_eplb-*.whl)"
"$work/venv/bin/python" -m pip install -q "${wheel}[test,gpu]"
"$work/venv/bin/python" -c 'import jax, flax; print(f"JAX {jax.__version__}, flax {flax.__version__}")'

mkdir "$work/elsewhere"
(
    cd "$work/elsewhere"
    package="$("$work/venv/bin/python" -c 'import jax_eplb, os; print(os.path.dirname(jax_eplb.__file__))')"
    case "$package" in "$work/venv/"*) ;; *) echo "jax_eplb imported from $package, not the installed wheel"; exit 1;; esac
    "$work/venv/bin/jax-eplb" demo --synthetic --output_dir demo > demo.log
    grep -q "lower" demo.log && test -s demo/load_heatmap.png
    "$work/venv/bin/jax-eplb" create-checkpoint --hf_config deepseek_v3 --num_layers 1 --num_experts 2 --fp8 \
        --vocab_size 256 --output ckpt
    test -s ckpt/config.json
    echo "installed wheel: demo --synthetic and create-checkpoint --hf_config deepseek_v3 ran from another folder"
)

# The suite against the installed package: pytest from the venv (no checkout folder on sys.path).
"$work/venv/bin/pytest" -p no:cacheprovider "$@"
