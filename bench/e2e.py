#!/usr/bin/env python3
"""End-to-end benchmark of herald: a real outbox, real rendering, Postfix's smtp-sink.

Modes (all by default):
  drain   fills the outbox with EVENTS rows of vxc.approval_required (3 recipients each with
          the sample directory), runs `herald run --drain` and reports messages/s, wall time,
          how long planning and sending took, and the daemon's peak RSS. The reference from
          the same run is `smtp-source -s 4 -d` (4 sessions, each kept for message after
          message as herald keeps its own; herald's default is 8) into smtp-sink, with
          messages of herald's size. --connections and --batch-size set herald's.
  steady  (PostgreSQL only) runs the daemon and inserts events at a steady RATE per second
          for SECONDS, then reports insert-commit -> SMTP-accept latency percentiles (from
          the database: created_at, set at insert, and sent_at, set on the server's 250).
  idle    starts the daemon once the outbox is drained: start-up time to the "herald started"
          line, and CPU used over 5 s of idleness.

Usage:
  bench/e2e.py [--backend postgres|sqlite|both] [--events N] [--rate R] [--seconds S]
               [--smoke] [--bin PATH]
--smoke runs small sizes with the debug build and checks everything was delivered (CI);
it asserts no timing. Needs smtp-sink/smtp-source (Debian package postfix; bench/setup.sh
installs it without configuring a mail system) and, for PostgreSQL, a server reachable at
$HERALD_BENCH_POSTGRES (default postgres://postgres@127.0.0.1:5432/test).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every daemon and server this script starts, so that none outlives it however it ends.
STARTED = []


def start(args, **kwargs):
    process = subprocess.Popen(args, **kwargs)
    STARTED.append(process)
    return process


def stop_all():
    for process in STARTED:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def run_checked(args, what):
    """Runs a command; on failure, exits with its own error output rather than a traceback."""
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit(f"{what}: {args[0]} not found")
    except subprocess.CalledProcessError as err:
        sys.exit(f"{what} failed (exit {err.returncode}):\n{err.stderr.strip()}")
KIND = "vxc.approval_required"  # 1 provider + 2 customer recipients in the sample directory
STEADY_KIND = "vxc.speed_change_requested"  # 1 recipient


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Sink:
    """smtp-sink on a free loopback port."""

    def __init__(self):
        self.port = free_port()
        args = ["smtp-sink"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [f"127.0.0.1:{self.port}", "1024"]
        self.process = start(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self):
        self.process.terminate()
        self.process.wait()


def smtp_source_reference(messages, length):
    """Messages/s of `smtp-source -s 4 -d` into a fresh smtp-sink: the machine's SMTP limit."""
    sink = Sink()
    try:
        started = time.perf_counter()
        subprocess.run(
            ["smtp-source", "-s", "4", "-d", "-m", str(messages), "-l", str(length),
             "-f", "bench@herald.example", "-t", "sink@herald.example", f"127.0.0.1:{sink.port}"],
            check=True, stdout=subprocess.DEVNULL,
        )
        return messages / (time.perf_counter() - started)
    finally:
        sink.stop()


class Postgres:
    PHASES = ("SELECT extract(epoch FROM max(processed_at) - min(processed_at)), "
              "(SELECT extract(epoch FROM max(sent_at) - min(sent_at)) FROM herald_deliveries) "
              "FROM herald_outbox")

    def __init__(self, admin_url):
        self.admin = admin_url
        self.name = f"herald_bench_{os.getpid()}_{int(time.time())}"
        base, _, query = admin_url.partition("?")
        if base.count("/") < 3:
            sys.exit(f"HERALD_BENCH_POSTGRES must name a database: {admin_url}")
        self.psql(self.admin, f"CREATE DATABASE {self.name}")
        self.url = base.rsplit("/", 1)[0] + f"/{self.name}" + (f"?{query}" if query else "")

    @staticmethod
    def psql(url, sql):
        out = run_checked(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                          f"psql {url.split('@')[-1]}")
        return out.stdout.strip()

    def query(self, sql):
        return self.psql(self.url, sql)

    def fill(self, kind, payload, events):
        self.query(
            "INSERT INTO herald_outbox (kind, payload) "
            f"SELECT '{kind}', {quote(payload)} FROM generate_series(1, {events})"
        )

    def latencies_ms(self):
        rows = self.query(
            "SELECT 1000 * extract(epoch FROM d.sent_at - o.created_at) "
            "FROM herald_deliveries d JOIN herald_outbox o ON o.id = d.outbox_id "
            "WHERE d.state = 'sent' ORDER BY 1"
        )
        return [float(x) for x in rows.split()]

    def drop(self):
        self.psql(self.admin, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class Sqlite:
    PHASES = ("SELECT 86400 * (julianday(max(processed_at)) - julianday(min(processed_at))), "
              "(SELECT 86400 * (julianday(max(sent_at)) - julianday(min(sent_at))) FROM herald_deliveries) "
              "FROM herald_outbox")

    def __init__(self, folder):
        self.path = os.path.join(folder, "herald.db")
        self.url = f"sqlite://{self.path}"

    def query(self, sql):
        with sqlite3.connect(self.path) as db:
            rows = db.execute(sql).fetchall()
        return "\n".join("|".join(str(v) for v in row) for row in rows)

    def fill(self, kind, payload, events):
        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT INTO herald_outbox (kind, payload) VALUES (?, ?)",
                           ((kind, payload) for _ in range(events)))

    def drop(self):
        pass


def quote(text):
    return "'" + text.replace("'", "''") + "'"


def write_config(folder, database_url, smtp_port, tuning):
    text = open(os.path.join(REPO, "config/herald.yaml")).read()
    text = text.replace("url: sqlite://../var/herald.db", f"url: {database_url}")
    text = text.replace("  kind: file ", "  kind: smtp ")
    text = text.replace("    port: 25\n", f"    port: {smtp_port}\n")
    text = re.sub(r"rate_limit:\n(  .*\n|  #.*\n)*", "rate_limit:\n  per_second: 1000000\n  burst: 1000000\n", text)
    text = text.replace("dir: ../templates", f"dir: {REPO}/templates")
    text = text.replace("samples: ../examples/payloads", f"samples: {REPO}/examples/payloads")
    text = text.replace("dir: ../var/mail", f"dir: {folder}/mail")
    if tuning.connections is not None:
        text = re.sub(r"connections: \d+", f"connections: {tuning.connections}", text)
    if tuning.batch_size is not None:
        text = re.sub(r"batch_size: \d+", f"batch_size: {tuning.batch_size}", text)
    path = os.path.join(folder, "herald.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def herald(binary, config, *args):
    return run_checked([binary, "--config", config, *args], f"herald {args[0]}")


def drain(binary, config, db, events):
    payload = open(os.path.join(REPO, f"examples/payloads/{KIND}.json")).read()
    db.fill(KIND, payload, events)
    env = dict(os.environ, RUST_LOG="warn")
    started = time.perf_counter()
    process = start([binary, "--config", config, "run", "--drain"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if status != 0:
        sys.exit(f"herald run --drain failed:\n{stderr.decode(errors='replace')}")
    sent = int(db.query("SELECT count(*) FROM herald_deliveries WHERE state = 'sent'"))
    total = int(db.query("SELECT count(*) FROM herald_deliveries"))
    if sent != 3 * events or total != 3 * events:
        sys.exit(f"the drain ended with {sent} of {3 * events} messages sent ({total} planned): "
                 "no throughput figure\n" + stderr.decode(errors="replace")[-2000:])
    planning, sending = (float(x) for x in db.query(db.PHASES).split("|"))
    return {"messages": sent, "planned": total, "seconds": elapsed,
            "planning_seconds": planning, "sending_seconds": sending,
            "per_second": sent / elapsed, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def percentile(values, p):
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[index]


def steady(binary, config, db, rate, seconds):
    payload = open(os.path.join(REPO, f"examples/payloads/{STEADY_KIND}.json")).read()
    daemon = start([binary, "--config", config, "run"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
    time.sleep(1.0)
    producer = start(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", db.url],
                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    statement = f"INSERT INTO herald_outbox (kind, payload) VALUES ('{STEADY_KIND}', {quote(payload)});\n"
    events = int(rate * seconds)
    started = time.perf_counter()
    for i in range(events):
        target = started + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.stdin.write(statement)
        producer.stdin.flush()
    producer.stdin.close()
    producer.wait()
    deadline = time.time() + 30
    while int(db.query("SELECT count(*) FROM herald_deliveries WHERE state = 'sent'")) < events:
        if time.time() > deadline:
            break
        time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    latencies = db.latencies_ms()
    return {"events": events, "rate": rate, "delivered": len(latencies),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": latencies[-1] if latencies else float("nan")}


def idle(binary, config):
    started = time.perf_counter()
    daemon = start([binary, "--config", config, "run"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, env=dict(os.environ, RUST_LOG="info,sqlx=warn"), text=True)
    line = daemon.stderr.readline()
    while line and "herald started" not in line:
        line = daemon.stderr.readline()
    startup_ms = (time.perf_counter() - started) * 1000
    if not line:
        sys.exit("the daemon ended before it started")

    def cpu_ticks():
        fields = open(f"/proc/{daemon.pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    time.sleep(1.0)
    before = cpu_ticks()
    time.sleep(5.0)
    used = (cpu_ticks() - before) / os.sysconf("SC_CLK_TCK")
    rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{daemon.pid}/status").read()).group(1)) / 1024
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    return {"startup_ms": startup_ms, "idle_cpu_seconds_over_5s": used, "idle_rss_mib": rss}


def machine():
    cpus = os.cpu_count()
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    memory = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) // 1024 // 1024
    return f"{cpus} x {model}, {memory} GiB, {platform.platform()}"


def main():
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, even in CI logs
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so daemons and databases are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="200 events and 2 s of steady load on the debug build; overrides --events and --seconds")
    parser.add_argument("--bin", default=None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--connections", type=int, default=None,
                        help="transport.smtp.connections (default: herald's default)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="delivery.batch_size (default: the shipped configuration's)")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.seconds = 200, 2
    if args.events < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--events, --rate and --seconds must be positive")
    if args.connections is not None and not 1 <= args.connections <= 64:
        parser.error("--connections must be between 1 and 64, as herald allows")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.bin and not (os.path.isfile(args.bin) and os.access(args.bin, os.X_OK)):
        parser.error(f"--bin {args.bin}: not an executable file")
    binary = args.bin or os.path.join(REPO, "target", "debug" if args.smoke else "release", "herald")
    if args.smoke:
        print("smoke run on the debug build: the figures below are not benchmark results")
    if not args.bin:
        profile = [] if args.smoke else ["--release"]
        subprocess.run(["cargo", "build", "--quiet", *profile], cwd=REPO, check=True)
    for tool in ["smtp-sink", "smtp-source"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run bench/setup.sh (installs Debian's postfix package, unconfigured)")

    admin = os.environ.get("HERALD_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    results = {"machine": machine(), "binary": binary}
    message_length = 6000  # about the size of a rendered notification (layout, text and HTML)
    results["smtp_source_reference_per_second"] = smtp_source_reference(
        2000 if args.smoke else 20000, message_length)
    print(f"machine: {results['machine']}")
    print(f"smtp-source -s 4 -> smtp-sink: {results['smtp_source_reference_per_second']:.0f} msg/s")

    try:
        failed = run_backends(args, binary, admin, backends, results)
    finally:
        stop_all()
    if args.json:
        print(json.dumps(results, indent=2))
    if failed:
        sys.exit("not every message was delivered")


def run_backends(args, binary, admin, backends, results):
    failed = False
    for backend in backends:
        folder, db, sink = tempfile.mkdtemp(prefix=f"herald-bench-{backend}-"), None, None
        try:
            db = Postgres(admin) if backend == "postgres" else Sqlite(folder)
            sink = Sink()
            config = write_config(folder, db.url, sink.port, args)
            herald(binary, config, "migrate")
            herald(binary, config, "directory", "import", os.path.join(REPO, "examples/directory.yaml"))
            result = drain(binary, config, db, args.events)
            ratio = result["per_second"] / results["smtp_source_reference_per_second"]
            print(f"{backend} drain: {result['messages']}/{result['planned']} messages from {args.events} events "
                  f"in {result['seconds']:.2f} s = {result['per_second']:.0f} msg/s "
                  f"({ratio:.0%} of smtp-source; planning {result['planning_seconds']:.1f} s, sending "
                  f"{result['sending_seconds']:.1f} s), peak RSS {result['peak_rss_mib']:.1f} MiB, "
                  f"CPU {result['cpu_seconds']:.2f} s")
            results[f"{backend}_drain"] = result
            failed |= result["messages"] != 3 * args.events or result["planned"] != 3 * args.events
            if backend == "postgres":
                db.query("TRUNCATE herald_deliveries, herald_outbox")
                result = steady(binary, config, db, args.rate, args.seconds)
                print(f"postgres steady {args.rate:.0f} events/s for {args.seconds:.0f} s: "
                      f"{result['delivered']}/{result['events']} delivered, insert->accept "
                      f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms")
                results["postgres_steady"] = result
                failed |= result["delivered"] != result["events"]
            result = idle(binary, config)
            print(f"{backend} idle: started in {result['startup_ms']:.0f} ms, "
                  f"{result['idle_cpu_seconds_over_5s']:.2f} s CPU over 5 s idle, RSS {result['idle_rss_mib']:.1f} MiB")
            results[f"{backend}_idle"] = result
        finally:
            stop_all()
            if db is not None:
                db.drop()
            shutil.rmtree(folder, ignore_errors=True)
    return failed


if __name__ == "__main__":
    main()
