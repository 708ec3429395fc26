#!/usr/bin/env bash
# Checks the Promela model of the cutover protocol (docs/model/cutover.pml) with spin: an
# exhaustive safety run (DESIGN.md invariants 1, 2, 4, 5, 8), an exhaustive termination run (no
# execution runs forever, so with the end-state checks no writer is blocked forever), the
# reverse direction's safety runs (issue 19: reverse replication, revert, complete), and
# every mutant, each of which spin must find a violation in. One line per check; exits
# non-zero on any unexpected result. Installs spin (Debian package `spin`) when missing; the
# verifier spin writes is C, built with `cc`. See docs/model/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v spin >/dev/null 2>&1; then
  echo "check-model: installing spin (Debian package spin)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends spin >/dev/null
fi
command -v cc >/dev/null 2>&1 || { echo "check-model: no C compiler (cc) to build spin's verifier" >&2; exit 1; }

model="$PWD/docs/model/cutover.pml"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

failed=0

# verify NAME EXPECT SPIN_FLAGS CC_FLAGS PAN_FLAGS — EXPECT is `ok` (no error in the whole state
# space) or `violation` (spin must report one).
verify() {
  local name="$1" expect="$2" spin_flags="$3" cc_flags="$4" pan_flags="$5"
  rm -f pan pan.* ./*.trail
  cp "$model" cutover.pml
  # shellcheck disable=SC2086
  if ! spin $spin_flags -a cutover.pml >spin.out 2>&1; then
    echo "model: $name: FAILED (spin could not translate the model)"
    cat spin.out
    failed=1
    return
  fi
  # gcc's -Wstringop-overflow misreads spin's generated undo code: silence warnings. A mutant's
  # search stops at its first violation: building it without optimisation is quicker.
  local opt=-O2
  [ "$expect" = violation ] && opt=-O0
  # shellcheck disable=SC2086
  cc -w "$opt" $cc_flags -o pan pan.c
  local start end
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  ./pan $pan_flags >pan.out 2>&1 || true
  end=$(date +%s.%N)
  local secs errors states
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' pan.out | tail -1)
  states=$(awk '/states, stored/ { print $1; exit }' pan.out)
  if grep -q "max search depth too small" pan.out; then
    echo "model: $name: FAILED (the search depth limit cut the search short)"
    failed=1
    return
  fi
  case "$expect:${errors:-?}" in
    ok:0)
      echo "model: $name: ok ($states states, ${secs} s)"
      ;;
    violation:0 | violation:\?)
      echo "model: $name: FAILED (spin found no violation: the model lost its teeth)"
      failed=1
      ;;
    violation:*)
      local what
      what=$(grep -m1 -E '^pan:[0-9]+: ' pan.out | sed 's/^pan:[0-9]*: //; s/ (at depth.*//')
      echo "model: $name: found the violation as expected ($what; ${secs} s)"
      ;;
    *)
      echo "model: $name: FAILED"
      cat pan.out
      if ls ./*.trail >/dev/null 2>&1; then
        echo "--- the counterexample (spin -t -p) ---"
        # shellcheck disable=SC2086
        spin $spin_flags -t -p -g cutover.pml | tail -80
      fi
      failed=1
      ;;
  esac
}

total_start=$(date +%s)
verify "safety: invariants 1, 2, 4, 5, 8 (3 writers, stop or abort)" ok \
  "" "-DSAFETY" "-m200000 -w24"
verify "safety: invariants 1, 2, 4, 5, 8 (2 writers, stop and abort)" ok \
  "-DWRITERS=2 -DSTOP_AND_ABORT" "-DSAFETY" "-m200000 -w22"
verify "termination: no execution runs forever (2 writers, stop or abort)" ok \
  "-DWRITERS=2" "-DNP" "-l -m200000 -w22"
for mutant in OLD_EMERGENCY_STOP OLD_STOP_STALE_SOURCE OLD_STOP_SKIPPED_REOPEN \
  AMBIGUOUS_COMMIT_AS_ROLLBACK REREAD_WITHOUT_LOCK RECOVER_WITHOUT_LOCK APPEND_WITHOUT_FENCE_LOCK \
  FOLLOW_HELD_FENCE OPEN_TARGET_FIRST; do
  verify "mutant $mutant" violation "-D$mutant" "-DSAFETY" "-m200000 -w24"
done
# The gate's recheck frees a writer whose proxy reloaded onto cutover_paused after a moved fence
# it could not follow (the target not configured on that proxy): the model's deaf proxy follows
# every fence it meets, so this mutant runs without the follow step.
verify "mutant GATE_WITHOUT_RECHECK (a proxy that cannot follow)" violation \
  "-DGATE_WITHOUT_RECHECK -DNO_FOLLOW" "-DSAFETY" "-m200000 -w24"
# The emergency stop before issue 17 (it fails a migration in cutover without the fence, then
# reopens a fence the cutover moved meanwhile): routing names the moved source until the reopen
# (INV1, off here). With the writers' follow step, appends acknowledged on the target are lost
# (INV2), or a writer that followed to the target is left waiting (the end-state check). Reopening
# the source also leaves both stores open (INV8, off here too).
verify "mutant STOP_REOPENS without INV1 (appends acknowledged on the target are lost)" violation \
  "-DSTOP_REOPENS -DNO_INV1 -DNO_INV8" "-DSAFETY" "-m200000 -w24"
# The stale source's own race (a migrated tenant routed back to its old source, whose fence is
# reopened), past the violations of INV1 and INV8 spin meets first.
verify "mutant OLD_STOP_STALE_SOURCE without INV1 (the first race)" violation \
  "-DOLD_STOP_STALE_SOURCE -DNO_INV1 -DNO_INV8" "-DSAFETY" "-m200000 -w24"
# Issue 19's reverse direction (REVERT): after M's cutover S → T, reverse replication and a
# revert R (T → S, Engine::cutover with the roles swapped), with its failures, rollback, crashes
# and recovery. Smaller configurations than the forward runs (see docs/model/README.md): 2 writers,
# M's driver does not crash, and one of three settings each.
verify "safety, revert: invariants 1, 2, 4, 5, 8 both ways (R's crashes; writer 1 appends again)" ok \
  "-DREVERT -DWRITERS=2" "-DSAFETY -DCOLLAPSE" "-m200000 -w25"
verify "safety, revert: M's driver and recoverer acting late, during R" ok \
  "-DREVERT -DWRITERS=2 -DSTALE_FORWARD" "-DSAFETY -DCOLLAPSE" "-m200000 -w25"
verify "safety, revert: complete racing revert (R's crashes)" ok \
  "-DREVERT -DWRITERS=2 -DCOMPLETE -DSECOND_APPENDS=0" "-DSAFETY -DCOLLAPSE" "-m200000 -w25"
for mutant in REVERT_OPENS_SOURCE_FIRST REVERSE_ADMITS_WRITERS; do
  verify "mutant $mutant" violation "-DREVERT -DWRITERS=2 -D$mutant" "-DSAFETY" "-m200000 -w24"
done
verify "mutant REVERT_WITHOUT_DELTA (the reverse mirror and tail running)" violation \
  "-DREVERT -DWRITERS=2 -DCOPIERS -DREVERT_WITHOUT_DELTA" "-DSAFETY" "-m200000 -w24"
# open_fence as the code has it: a late forward driver or recoverer reopens T after R moved it.
verify "mutant OPEN_TARGET_UNCONDITIONALLY (M's actors late)" violation \
  "-DREVERT -DWRITERS=2 -DSTALE_FORWARD -DOPEN_TARGET_UNCONDITIONALLY" "-DSAFETY" "-m200000 -w24"
echo "model: all checks took $(($(date +%s) - total_start)) s"
exit "$failed"
