import ArgumentParser
import EntryPoints
import LabKit

/// Exit statuses, documented in the README and `memlab --help`.
enum ExitStatus {
    static let ok: Int32 = 0
    static let failed: Int32 = 1
    static let usage: Int32 = 2
    static let skipped: Int32 = 3
    static let busy: Int32 = 4
}

struct Memlab: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memlab",
        abstract: "Exercise the Linux memory features virtualization brought in, on the running kernel, and measure them.",
        discussion: """
        Scenarios drive the real kernel features (KSM, huge pages, overcommit, zswap, userfaultfd) and report \
        metrics in one JSON result format (schema memlab.result/1). Machine-wide settings a run borrows are \
        journaled under $MEMLAB_STATE_DIR (default /var/lib/memlab) and restored afterwards, also after Ctrl-C \
        or a killed runner (on the next memlab start, or with `memlab restore`).

        Exit status: 0 ok; 1 a run failed; 2 bad usage or input (nothing was changed); \
        3 skipped (feature missing, not root); 4 another memlab holds the settings lock (--no-wait).
        """,
        version: memlabVersion,
        subcommands: [List.self, Probe.self, Settings.self, Run.self, Suite.self, Compare.self, Report.self, Restore.self, BenchCommand.self, Migrate.self, Calibrate.self, PageSourceCommand.self, VM.self, GuestRunCommand.self] + HiddenEntryPoints.commands
    )
}

let memlabVersion = "0.1.0"
