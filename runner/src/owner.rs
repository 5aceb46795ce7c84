//! Which process runs a trial, and whether that process is still alive: `sweep run`s on one
//! results DB take trials by writing their owner into it, and take over a trial whose owner
//! has died (a killed or pre-empted run).

use std::time::{Duration, SystemTime};

/// A process on another host is taken for dead when its trial's heartbeat (written at every
/// evaluation and checkpoint) is older than this.
const STALE: Duration = Duration::from_secs(30 * 60);

/// `host:pid:start`, start being the process's start time in clock ticks since boot, so that
/// a reused pid is not mistaken for the same process.
pub fn me() -> String {
    let pid = std::process::id();
    format!("{}:{pid}:{}", host(), start_time(pid).unwrap_or(0))
}

/// Whether the owner recorded for a trial has died. On this host the process table says;
/// elsewhere a stale heartbeat (RFC 3339, UTC) does.
pub fn dead(owner: &str, heartbeat: Option<&str>) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host_name)) = (parts.next(), parts.next(), parts.next())
    else {
        return true;
    };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else {
        return true;
    };
    if host_name == host() {
        return start_time(pid) != Some(start);
    }
    heartbeat.and_then(age).is_none_or(|a| a > STALE)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

/// Field 22 of /proc/<pid>/stat; `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How long ago an RFC 3339 UTC time (`2026-11-22T10:44:41.123Z`) was.
fn age(t: &str) -> Option<Duration> {
    let (date, time) = t.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, _) = time.split_once('.').unwrap_or((time, ""));
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d.first()?, d.get(1)?, d.get(2)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if *m <= 2 { y - 1 } else { *y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h.first()? * 3600 + h.get(1)? * 60 + h.get(2)?;
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?);
    Some(SystemTime::now().duration_since(then).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_one_is_not() {
        assert!(!dead(&me(), None));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        assert!(dead(&format!("{}:{pid}:{start}", host()), None));
        // The same pid with another start time is another process.
        let mine = std::process::id();
        assert!(dead(&format!("{}:{mine}:1", host()), None));
        assert!(dead("garbage", None));
    }

    #[test]
    fn other_hosts_are_judged_by_their_heartbeat() {
        assert!(!dead("elsewhere:1:1", Some("2999-01-01T00:00:00.000Z")));
        assert!(dead("elsewhere:1:1", Some("2000-01-01T00:00:00.000Z")));
        assert!(dead("elsewhere:1:1", None));
        // 1970-01-02 is 86400 s after the epoch.
        let a = age("1970-01-02T00:00:00.000Z").unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert!((now - a).as_secs().abs_diff(86_400) <= 1);
    }
}
