#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import EntryPoints
import Foundation
import LabKit
import Scenarios
import LazyRestore
import Testing

/// memlab re-executing itself (`_child`, `_guest`, `_pagesource`): hidden commands whose
/// command lines the spawners write and the commands parse back, every value range-checked,
/// started before memlab's startup recovery and signal handler.
@Suite struct HiddenCommandLines {
    @Test func everyOneIsHiddenFromHelp() throws {
        #expect(HiddenEntryPoints.commands.count == 4)
        for c in HiddenEntryPoints.commands {
            #expect(!c.configuration.shouldDisplay && c.configuration.commandName?.hasPrefix("_") == true)
        }
        let dir = TempDir()
        let help = try Memlab.run(["--help"], stateDir: dir.path)
        #expect(help.status == 0)
        for name in ["_child", "_guest", "_pagesource", "_uffdhandler"] { #expect(!help.stdout.contains(name), "\(name) in memlab --help") }
    }

    /// What the spawners write parses back to what they meant (paths that look like options,
    /// values at the ends of their ranges included).
    @Test func theSpawnersCommandLinesParseBack() throws {
        let child = try ChildCommand.parse(Array(ChildMain.arguments(specPath: "-spec.json", outPath: "/run dir/out=1.json").dropFirst()))
        #expect(child.spec == "-spec.json" && child.out == "/run dir/out=1.json")

        var hog = Guest.Options(role: .hog, bytes: 1 << 30)
        hog.board = "--board"; hog.slots = 1; hog.slot = 0; hog.parent = 1; hog.oomScoreAdj = -1000
        var vm = Guest.Options(role: .vm, bytes: Guest.Options.maxBytes)
        vm.board = "/tmp/b"; vm.slots = Guest.Options.maxSlots; vm.slot = Guest.Options.maxSlots - 1
        vm.sharedRatio = 0.1; vm.baseSeed = .max; vm.seed = 0; vm.privatePattern = .random; vm.mergeable = true
        vm.passSleepMS = 0; vm.passes = 3; vm.timeSwapins = true
        var plain = Guest.Options(role: .vm, bytes: 4096)
        plain.board = "/tmp/b"
        for o in [hog, vm, plain] {
            #expect(o.arguments.first == "_guest")
            #expect(try GuestCommand.parse(Array(o.arguments.dropFirst())).options == o, "\(o.arguments)")
        }

        var unix = PageServerOptions()
        unix.kind = .unix; unix.listen = "/tmp/memlab-ps.sock"; unix.pages = PageServerOptions.maxPages; unix.seed = .max
        unix.zeroRatio = 1; unix.ready = "-ready"; unix.parent = 1
        var tcp = PageServerOptions()
        tcp.listen = "127.0.0.1:0"; tcp.pages = 1; tcp.zeroRatio = 0.1; tcp.announce = true; tcp.maxConnections = 4096; tcp.idleTimeoutS = 0.5
        for o in [unix, tcp] {
            #expect(o.check() == nil)
            #expect(o.arguments.first == "_pagesource")
            #expect(try PageSourceProcessCommand.parse(Array(o.arguments.dropFirst())).options == o, "\(o.arguments)")
        }
    }

    /// Hostile values exit 2 and say which and why; none traps (slots × slot size used to
    /// overflow in the board's mapping; unknown keys were ignored).
    @Test(arguments: [
        ["--slots=2305843009213693952"], ["--slots=0"], ["--slot=1"], ["--slot=-1"], ["--bytes=0"], ["--bytes=9223372036854775807"],
        ["--parent=0"], ["--oom-score-adj=1001"], ["--shared-ratio=nan"], ["--shared-ratio=2"], ["--role=vmm"],
        ["--private-pattern=loud"], ["--pass-sleep-ms=-1"], ["--passes=-1"], ["--colour=blue"], ["bytes=4096"], ["--board="],
    ])
    func guestRefusesBadArguments(bad: [String]) throws {
        let dir = TempDir()
        var args = ["--board=\(dir.file("board"))", "--slots=1", "--slot=0", "--bytes=4096"]
        for b in bad {
            let name = b.split(separator: "=", maxSplits: 1).first.map(String.init) ?? b
            args.removeAll { $0.hasPrefix(name + "=") }
            args.append(b)
        }
        let out = try Memlab.run(["_guest"] + args, stateDir: dir.path)
        #expect(out.status == 2, "\(args): \(out.status) \(out.stderr)")
        #expect(out.stderr.hasPrefix("memlab _guest: ") && out.stderr.contains("\nusage: memlab _guest "), "\(out.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("board")))
    }

    /// No signal handler of memlab's either: a page source process catches none of SIGINT,
    /// SIGTERM, SIGHUP (/proc/PID/status SigCgt), where `memlab pagesource`, a command like
    /// any other, catches all three (its restore-and-exit handler).
    @Test func noSignalHandler() throws {
        func caught(_ pid: Int32) -> UInt64 {
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("SigCgt:") }
            return line.flatMap { UInt64($0.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) } ?? 0
        }
        let handled = [SIGINT, SIGTERM, SIGHUP].reduce(UInt64(0)) { $0 | UInt64(1) << UInt64($1 - 1) }
        let dir = TempDir()
        let ready = dir.file("ready")
        let (hidden, _, _) = try Memlab.start(PageSourceProcessCommandLine.tcp(ready: ready), stateDir: dir.path)
        defer { kill(hidden.processIdentifier, SIGKILL); hidden.waitUntilExit() }
        let (visible, _, _) = try Memlab.start(["pagesource", "--listen", "127.0.0.1:0", "--size", "1M"], stateDir: dir.path)
        defer { kill(visible.processIdentifier, SIGKILL); visible.waitUntilExit() }
        #expect(waitFor(10) { ((try? String(contentsOfFile: ready, encoding: .utf8)) ?? "").hasSuffix("\n") })
        #expect(caught(hidden.processIdentifier) & handled == 0, "SigCgt \(String(caught(hidden.processIdentifier), radix: 16))")
        #expect(waitFor(10) { caught(visible.processIdentifier) & handled == handled }, "SigCgt \(String(caught(visible.processIdentifier), radix: 16))")
    }
}

private enum PageSourceProcessCommandLine {
    static func tcp(ready: String) -> [String] {
        var o = PageServerOptions()
        o.listen = "127.0.0.1:0"; o.pages = 16; o.seed = 1; o.zeroRatio = 0.1; o.ready = ready
        return o.arguments
    }
}

extension KernelTests {
    /// In the serialized kernel suite: `memlab list` with a journal in its state directory
    /// takes the machine-wide settings lock, which a guard test running beside it would find held.
    @Suite struct HiddenCommandStartup {
        /// A hidden command starts before memlab's startup: a journal in its state directory is
        /// not looked at (every other command warns about this malformed one).
        @Test func noStartupRecovery() throws {
            let dir = TempDir()
            let journal = dir.file("journal.json")
            #expect(FileManager.default.createFile(atPath: journal, contents: Data("{".utf8), attributes: [.posixPermissions: 0o600]))
            let list = try Memlab.run(["list"], stateDir: dir.path)
            // (Unless another memlab holds the settings lock: then it says it leaves it for later.)
            #expect(list.stderr.contains(journal) || list.stderr.contains("the settings lock is held by"), "memlab list: \(list.stderr)")
            for args in [["_guest", "--slots=0"], ["_child", "--spec=\(dir.file("spec"))"], ["_pagesource", "--kind=tcp"]] {
                let out = try Memlab.run(args, stateDir: dir.path)
                #expect(out.status == 2 && !out.stderr.contains(journal), "\(args): \(out.stderr)")
            }
            #expect(FileManager.default.contents(atPath: journal) == Data("{".utf8))
            // Removed here: the TempDir would run `memlab restore` on it, taking the settings lock.
            unlink(journal)
        }
    }
}
