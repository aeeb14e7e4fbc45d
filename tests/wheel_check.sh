#!/usr/bin/env bash
# The wheel as a user installs it (`make wheel-check`; .ci/run runs it after the suite): build the wheel of this
# checkout, install it into a fresh venv with its mandatory dependencies only (after the pinned torch, as `make
# setup` does), train the quickstart for one epoch from another directory with a fresh HOME (no W&B key, no
# dataset cache), write a Hub folder (no extra needed), and check that the features of the extras it lacks
# (`export --onnx`, the deepspeed strategy) say in one line how to install them. PY and TORCH_PIP as for `make
# setup`; WHEEL_CHECK_KEEP=1 keeps the folder it works in (about 6 GB with the CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_PIP=${TORCH_PIP:-}
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/alexdist-wheel-check.XXXXXX")
if [ -n "${WHEEL_CHECK_KEEP:-}" ]; then echo "wheel-check: working in $work"; else trap 'rm -rf "$work"' EXIT; fi
fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }
say() { echo "wheel-check: $* ($(( $(date +%s) - start )) s)"; }

# The checkout's files (tracked and new, not ignored) in a folder of their own: setuptools builds in the source
# tree, and a build/ left there from an older checkout would put deleted modules into the wheel.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - \
    | tar -xf - -C "$work/src"
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/pip" -q)
# shellcheck disable=SC2086  # TORCH_PIP is a list of pip options
"${pip[@]}" install $TORCH_PIP torch==2.14.1 torchvision==0.29.1
"${pip[@]}" wheel --no-deps "$work/src" -w "$work/dist"
wheel=$(echo "$work"/dist/alexdist-*.whl)
"${pip[@]}" install "$wheel"
say "installed $(basename "$wheel") with its mandatory dependencies"
for pkg in onnx onnxscript onnxruntime deepspeed tensorboard; do
    if "$work/venv/bin/pip" show -q "$pkg" 2>/dev/null; then fail "$pkg came with the mandatory dependencies"; fi
done

# A user's shell: the venv's commands, another directory, a HOME of its own; nothing of this checkout's or this
# machine's alexdist and W&B settings.
mkdir "$work/elsewhere" "$work/home"
cd "$work/elsewhere"
as_user() {
    env -u PYTHONPATH -u ALEXDIST_CACHE -u WANDB_API_KEY -u WANDB_BASE_URL -u WANDB_MODE HOME="$work/home" \
        PATH="$work/venv/bin:$PATH" "$@"
}
found=$(as_user python -c "import alexdist; print(alexdist.__file__)")
[[ $found == "$work/venv/"* ]] || fail "alexdist imports from $found, not from the installed wheel"

t0=$(date +%s)
as_user alexdist train quickstart train.epochs=1 output_dir="$work/run" >"$work/train.log" 2>&1 \
    || { tail -30 "$work/train.log"; fail "alexdist train quickstart failed"; }
grep -q "^alexdist: done at step" "$work/train.log" || { tail -30 "$work/train.log"; fail "no 'done' line"; }
for f in model.safetensors summary.json confusion.png; do
    [ -f "$work/run/$f" ] || fail "the run left no $f"
done
[ -z "$(ls -A "$work/elsewhere")" ] || fail "the run wrote into the current directory: $(ls -A "$work/elsewhere")"
say "alexdist train quickstart train.epochs=1 in $(( $(date +%s) - t0 )) s: $(grep '^alexdist: done' "$work/train.log")"

as_user alexdist export "$work/run" "$work/model.safetensors" --hub-dir "$work/hub" >"$work/hub.log" 2>&1 \
    || { cat "$work/hub.log"; fail "alexdist export --hub-dir failed"; }
[ -f "$work/hub/README.md" ] && [ -f "$work/hub/config.json" ] || fail "the Hub folder lacks its card or config"

# A feature of an extra that is not installed: exit 4 (SetupError), one line with the command that installs the
# extra, and no file written (a run's output_dir may be there, empty).
needs_extra() {  # EXTRA NOT_WRITTEN COMMAND...
    local extra=$1 left=$2 code=0
    shift 2
    as_user "$@" >"$work/hint.out" 2>"$work/hint.err" || code=$?
    local hint="pip install 'alexdist[$extra]'"
    if [ "$code" != 4 ] || [ "$(wc -l <"$work/hint.err")" != 1 ] || ! grep -qF "$hint" "$work/hint.err"; then
        cat "$work/hint.out" "$work/hint.err"
        fail "$* without the $extra extra: exit $code, not one line with $hint"
    fi
    [ -z "$(find "$left" -type f 2>/dev/null)" ] || fail "$* wrote $left before saying what it needs"
    say "$(cat "$work/hint.err")"
}
needs_extra onnx "$work/again.safetensors" alexdist export "$work/run" "$work/again.safetensors" --onnx "$work/x.onnx"
needs_extra deepspeed "$work/zero" alexdist train quickstart distributed.strategy=deepspeed output_dir="$work/zero"
say "ok"
