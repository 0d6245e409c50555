#!/usr/bin/env bash
# One-shot device check of kvjax on a fresh GPU or TPU machine (under 8 minutes; device time is scarce).
#
#   scripts/accelerator_check.sh OUTDIR [--dry-run] [--steps kernels,score,decode,memory]
#
# 1. detects the machine (nvidia-smi -> GPU, /dev/accel* or /dev/vfio -> TPU), makes a venv (.venv-accel,
#    --system-site-packages) and installs jax[cuda12] or jax[tpu] (KVJAX_JAX_VERSION, default 0.10.2) and this
#    package, unless that venv already imports jax with the right backend (a machine without network access needs
#    jax preinstalled, or a wheel folder: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels);
# 2. kernels: the `compiled` kernel tests with KVJAX_TEST_COMPILED=1 (each kernel compiled on its platform against
#    its reference; fails if any compiled kernel differs, or if none ran);
# 3. score: `kvjax bench score --shape paper --lengths 32768,131072`;
# 4. decode: `kvjax bench decode --shape llama-3.1-8b-instruct --dtype bfloat16` at 32768 and 131072 tokens for
#    full,yakv,yakv-serving,shadowkv (one process per length; a failed length is retried method by method);
# 5. memory: `kvjax bench memory` at the decode shape, dtype and lengths (compile only);
# 6. control: `full` at the longest length with KVJAX_KERNELS=reference (XLA's attention instead of the kernel), so
#    the full-attention baseline is known both ways;
# and writes OUTDIR/{check.json, summary.md, kernels.xml, score.json, decode_<T>.json, memory.json, logs/}.
# Exit status: 0 all passed; 1 a step failed (a compiled kernel differs from its reference, a bench crashed or
# timed out); 2 bad arguments; 3 no usable accelerator / JAX install.
#
# --dry-run: the same steps on CPU jax with tiny shapes (smollm2 shapes, 2560 tokens, kernels in interpret mode on a
# few cases), no install when the current python (PYTHON, default python3) already imports jax and flax.
# --steps: run only these steps (to rerun what failed). KVJAX_CHECK_BUDGET_S (default 450) caps the whole run;
# each step gets what is left of it.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run] [--steps kernels,score,decode,memory]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=""; DRY=0; STEPS="kernels,score,decode,memory"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) shift; [ $# -gt 0 ] || usage; STEPS="$1" ;;
    -h|--help) usage ;;
    -*) echo "kvjax: error: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
for s in ${STEPS//,/ }; do
  case "$s" in kernels|score|decode|memory) ;; *) echo "kvjax: error: --steps: unknown step '$s' (allowed: kernels, score, decode, memory)" >&2; exit 2 ;; esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
BUDGET=${KVJAX_CHECK_BUDGET_S:-450}
STATUS="$OUT/logs/status.tsv"     # step <TAB> rc <TAB> seconds <TAB> note
: > "$STATUS"
FAILED=0

log() { echo "[accelerator_check $(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# run NAME CAP_SECONDS CMD...: logs to logs/NAME.log, bounded by min(CAP, budget left); records the status.
run() {
  local name="$1" cap="$2"; shift 2
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    log "$name: skipped (budget spent)"; printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped: budget" >> "$STATUS"
    FAILED=1; return 124
  fi
  local t0; t0=$(date +%s)
  log "$name (limit ${t}s): $*"
  timeout --kill-after=10 "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local note="ok"; [ $rc -ne 0 ] && note="failed"; [ $rc -eq 124 ] && note="timed out"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >> "$STATUS"
  log "$name: $note (rc=$rc, ${dt}s)"
  [ $rc -ne 0 ] && tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'
  return $rc
}

# ---------------------------------------------------------------------------------------------- platform
if [ $DRY -eq 1 ]; then
  PLATFORM=cpu
elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
  PLATFORM=gpu
elif ls /dev/accel* > /dev/null 2>&1 || [ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_NAME:-}" ] || ls /dev/vfio/[0-9]* > /dev/null 2>&1; then
  PLATFORM=tpu
else
  echo "kvjax: error: no GPU (nvidia-smi) or TPU (/dev/accel*, /dev/vfio) found; use --dry-run on CPU" >&2
  exit 3
fi
log "platform: $PLATFORM (dry run: $DRY), output: $OUT"

# ---------------------------------------------------------------------------------------------- python
PY="${PYTHON:-python3}"
JAXV="${KVJAX_JAX_VERSION:-0.10.2}"
has_backend() {  # PYTHON WANT: does it import jax + flax with that default backend?
  JAX_PLATFORMS="$([ "$2" = gpu ] && echo cuda || echo "$2")" "$1" -c "
import jax, flax, numpy
assert jax.default_backend() == '$2', jax.default_backend()" > /dev/null 2>&1
}
if [ $DRY -eq 1 ] && has_backend "$PY" cpu; then
  log "using $PY ($("$PY" -c 'import jax; print("jax", jax.__version__)'))"
else
  VENV="${KVJAX_CHECK_VENV:-$REPO/.venv-accel}"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || { echo "kvjax: error: cannot create $VENV" >&2; exit 3; }
  PY="$VENV/bin/python"
  if has_backend "$PY" "$PLATFORM"; then
    log "using $PY (already has jax for $PLATFORM)"
  else
    case "$PLATFORM" in gpu) EXTRA="jax[cuda12]==$JAXV" ;; tpu) EXTRA="jax[tpu]==$JAXV" ;; *) EXTRA="jax==$JAXV" ;; esac
    run install 240 "$PY" -m pip install --quiet --disable-pip-version-check "$EXTRA" -e "$REPO[test]"
    if ! has_backend "$PY" "$PLATFORM"; then
      echo "kvjax: error: $PY cannot run jax on $PLATFORM after installing $EXTRA (see $OUT/logs/install.log)" >&2
      exit 3
    fi
  fi
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$PLATFORM" in gpu) export JAX_PLATFORMS=cuda ;; *) export JAX_PLATFORMS=$PLATFORM ;; esac
"$PY" -c "
import json, jax
d = jax.devices()[0]
json.dump(dict(platform=jax.default_backend(), device_kind=d.device_kind, devices=len(jax.devices()),
               jax=jax.__version__), open('$OUT/logs/machine.json', 'w'))
print(jax.default_backend(), d.device_kind, 'x', len(jax.devices()), 'jax', jax.__version__)" > "$OUT/logs/machine.txt" 2>&1
log "machine: $(cat "$OUT/logs/machine.txt")"
cd "$REPO" || exit 2

if [ $DRY -eq 1 ]; then
  SCORE_ARGS=(--shape smollm2 --lengths 1024)
  DEC_SHAPE=smollm2-135m; DEC_DTYPE=float32; DEC_LENGTHS="2560"; DEC_STEPS=(--steps 2)
  # interpret mode, a few representative cases of each kernel (the full sweep runs compiled on the device)
  KTESTS=(-k "(small_blocks and serve) or (segments_equal and float32) or float32-1-7-2 or lengths_bh-one")
  KENV=()
else
  SCORE_ARGS=(--shape paper --lengths 32768,131072)
  DEC_SHAPE=llama-3.1-8b-instruct; DEC_DTYPE=bfloat16; DEC_LENGTHS="32768 131072"; DEC_STEPS=()
  KTESTS=()
  KENV=(env KVJAX_TEST_COMPILED=1 JAX_DEFAULT_MATMUL_PRECISION=highest)
fi
METHODS=full,yakv,yakv-serving,shadowkv
CLI=("$PY" -m kvjax.cli bench)

# ---------------------------------------------------------------------------------------------- steps
if want kernels; then
  run kernels 200 ${KENV[@]+"${KENV[@]}"} "$PY" -m pytest tests/pallas_kernels -m compiled -q -p no:cacheprovider \
      --junitxml "$OUT/kernels.xml" ${KTESTS[@]+"${KTESTS[@]}"} || FAILED=1
  # a device run where every compiled test skipped (e.g. jax fell back to CPU) checked nothing: a failure
  if [ $DRY -eq 0 ]; then
    RAN=$("$PY" -c "
import xml.etree.ElementTree as ET
r = ET.parse('$OUT/kernels.xml').getroot()
s = r if r.tag == 'testsuite' else r[0]
print(int(s.get('tests')) - int(s.get('skipped')))" 2>/dev/null || echo 0)
    if [ "$RAN" -lt 1 ]; then
      log "kernels: no compiled kernel test ran"; printf 'kernels-ran\t1\t0\tno compiled test ran\n' >> "$STATUS"
      FAILED=1
    fi
  fi
fi

if want score; then
  run score 150 "${CLI[@]}" score "${SCORE_ARGS[@]}" --json "$OUT/score.json" || FAILED=1
fi

if want decode; then
  for T in $DEC_LENGTHS; do
    if ! run "decode_$T" 240 "${CLI[@]}" decode --shape "$DEC_SHAPE" --dtype "$DEC_DTYPE" --lengths "$T" \
        --methods "$METHODS" ${DEC_STEPS[@]+"${DEC_STEPS[@]}"} --json "$OUT/decode_$T.json"; then
      FAILED=1
      if [ "$(left)" -gt 90 ]; then   # isolate the method that broke the run; keep the others' rows
        for M in ${METHODS//,/ }; do
          run "decode_${T}_$M" 150 "${CLI[@]}" decode --shape "$DEC_SHAPE" --dtype "$DEC_DTYPE" --lengths "$T" \
              --methods "$M" ${DEC_STEPS[@]+"${DEC_STEPS[@]}"} --json "$OUT/decode_${T}_$M.json"
        done
      fi
    fi
  done
fi

if want memory; then
  # compile-only: the decode lengths, the decode shape and dtype (8 programs on the device shape)
  run memory 150 "${CLI[@]}" memory --shape "$DEC_SHAPE" --dtype "$DEC_DTYPE" --lengths "${DEC_LENGTHS// /,}" \
      --methods "$METHODS" --json "$OUT/memory.json" || FAILED=1
fi

if want decode; then
  TMAX=${DEC_LENGTHS##* }
  run "decode_${TMAX}_full_reference" 150 env KVJAX_KERNELS=reference "${CLI[@]}" decode --shape "$DEC_SHAPE" \
      --dtype "$DEC_DTYPE" --lengths "$TMAX" --methods full ${DEC_STEPS[@]+"${DEC_STEPS[@]}"} \
      --json "$OUT/decode_${TMAX}_full_reference.json" || FAILED=1
fi

# ---------------------------------------------------------------------------------------------- report
"$PY" - "$OUT" "$PLATFORM" "$DRY" "$FAILED" << 'EOF'
import glob, json, os, re, sys, xml.etree.ElementTree as ET

out, platform, dry, failed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
status = [dict(zip(("step", "rc", "seconds", "note"), line.rstrip("\n").split("\t")))
          for line in open(os.path.join(out, "logs", "status.tsv")) if line.strip()]
machine = {}
if os.path.exists(os.path.join(out, "logs", "machine.json")):
    machine = json.load(open(os.path.join(out, "logs", "machine.json")))


def load(path):
    try:
        return json.load(open(path))["rows"]
    except (OSError, ValueError, KeyError):
        return []


def table(rows, cols):
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


md = [f"# kvjax accelerator check ({'dry run, ' if dry else ''}{platform})", "",
      f"machine: {machine}", "", "## Steps", "", table(status, ["step", "rc", "seconds", "note"]), ""]
report = dict(platform=platform, dry_run=dry, machine=machine, steps=status, failed=failed)

kx = os.path.join(out, "kernels.xml")
if os.path.exists(kx):
    root = ET.parse(kx).getroot()
    cases = []
    for tc in root.iter("testcase"):
        res = "passed"
        for tag in ("failure", "error", "skipped"):
            if tc.find(tag) is not None:
                res = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
        cases.append(dict(test=f"{tc.get('classname')}::{tc.get('name')}", result=res, seconds=float(tc.get("time", 0))))
    counts = {k: sum(c["result"] == k for c in cases) for k in ("passed", "FAILED", "ERROR", "skipped")}
    report["kernels"] = dict(counts=counts, cases=cases)
    md += ["## Compiled kernels vs references", "", f"{counts}", ""]
    bad = [c for c in cases if c["result"] in ("FAILED", "ERROR")]
    if bad:
        md += [table(bad, ["test", "result"]), ""]

score = load(os.path.join(out, "score.json"))
if score:
    report["score"] = score
    md += ["## Landmark scoring (kvjax bench score)", "",
           table(score, ["landmarks", "mode", "method", "layers", "MB_read", "score_ms", "score_GBps", "stream_GBps",
                         "hbm_frac", "attn_ms", "cost_ratio", "hbm_target_met"]), ""]

dec = []
for path in sorted(glob.glob(os.path.join(out, "decode_*.json"))):
    for r in load(path):
        if path.endswith("_reference.json"):
            r["method"] += " (KVJAX_KERNELS=reference)"
        if r not in dec:
            dec.append(r)
if dec:
    report["decode"] = dec
    for r in dec:
        full = [f for f in dec if f["method"] == "full" and f["prompt_tokens"] == r["prompt_tokens"]]
        r["vs_full"] = r["ms_per_step"] / full[0]["ms_per_step"] if full else None
    md += ["## Decode step (kvjax bench decode)", "",
           table(dec, ["method", "prompt_tokens", "ms_per_step", "vs_full", "device_MB", "host_MB",
                       "fetched_MB_per_step"]), "",
           "target: yakv-serving at 131072 tokens <= 0.3x full (vs_full); fetched_MB_per_step is the policy's own "
           "count of selected rows x row bytes, not a measured transfer.", ""]
    logs = "".join(open(p, errors="replace").read() for p in glob.glob(os.path.join(out, "logs", "decode_*.log")))
    n = len(re.findall(r"[Cc]onverting into host compute", logs))
    report["host_compute_warnings"] = n
    md += [f"XLA 'Converting into host compute' warnings in the decode logs: {n}", ""]

mem = load(os.path.join(out, "memory.json"))
if mem:
    report["memory"] = mem
    md += ["## Memory (kvjax bench memory)", "", table(mem, sorted({k for r in mem for k in r})), ""]

md += [f"**{'FAILED' if failed else 'PASSED'}**", ""]
json.dump(report, open(os.path.join(out, "check.json"), "w"), indent=1, default=float)
open(os.path.join(out, "summary.md"), "w").write("\n".join(md))
print("\n".join(md))
EOF
log "done in $(( $(date +%s) - START ))s: $([ $FAILED -eq 0 ] && echo PASSED || echo FAILED); see $OUT/summary.md"
exit $FAILED
