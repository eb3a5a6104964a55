#!/usr/bin/env bash
# Run a docembed job from cron and log to a file. Each run embeds only what is new or changed since
# the last one (committed units are skipped; a changed file's rows are replaced), and the output lock
# makes a run that starts while the previous one is still going exit at once with code 75 (EX_TEMPFAIL:
# "try again later") instead of racing it; 2 means the job is misconfigured, 1 that it failed, and 3 (with
# --fail-on-drift) that it completed but its input or vectors drifted from the earlier runs'.
# Relative paths in JOB.yaml are relative to its folder, so cron's working directory does not matter; extra
# flags' relative paths would be cron's working directory's: give them absolute.
# Usage: docembed-cron.sh JOB.yaml [extra flags]
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
job="${1:?usage: docembed-cron.sh JOB.yaml [flags]}"; shift
log_dir="${DOCEMBED_LOG_DIR:-$repo/logs}"
mkdir -p "$log_dir"
log="$log_dir/$(basename "$job" .yaml)-$(date -u +%Y%m%dT%H%M%SZ).log"
{
  echo "# $(date -u +%FT%TZ) docembed run --job $job $*"
  "$repo/.venv/bin/docembed" run --job "$job" --no-progress "$@"
  code=$?
  if [ "$code" -eq 75 ]; then
    echo "# $(date -u +%FT%TZ) exit 75: the previous run still holds the output; this tick did nothing"
  elif [ "$code" -eq 3 ]; then
    echo "# $(date -u +%FT%TZ) exit 3: embedded and committed, but drift was flagged (the drift line above)"
  else
    echo "# $(date -u +%FT%TZ) exit $code"
  fi
} >>"$log" 2>&1
exit "${code:-1}"
