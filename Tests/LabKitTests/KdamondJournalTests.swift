#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit
import LinuxMM

/// The guard's record of a DAMON kdamond memlab added (`reclaim:damon`): journaled under
/// its own key, refused when it names anything but a kdamond directory, and given back even
/// when it is already gone. None of these writes to DAMON.
@Suite struct KdamondJournalTests {
    func journal(_ dirs: [String]) -> Journal {
        var j = Journal(ownerPID: 1, ownerStart: 1, command: "test")
        j.kdamonds = dirs
        return j
    }

    @Test func encodedUnderItsOwnKeyAndOptional() throws {
        let j = journal(["\(Damon.kdamonds)/0"])
        let text = String(decoding: try JSONEncoder().encode(j), as: UTF8.self)
        #expect(text.contains("\"kdamonds\":[\"\\/sys\\/kernel\\/mm\\/damon\\/admin\\/kdamonds\\/0\"]"), "\(text)")
        #expect(try JSONDecoder().decode(Journal.self, from: Data(text.utf8)) == j)
        // A journal written before kdamonds existed still decodes.
        let old = #"{"owner_pid":1,"owner_start":1,"command":"x","entries":[],"created_directories":[]}"#
        let decoded = try JSONDecoder().decode(Journal.self, from: Data(old.utf8))
        #expect(decoded.kdamonds == nil && decoded.isEmpty)
        #expect(!j.isEmpty, "a kdamond alone is something to give back")
    }

    @Test func onlyKdamondDirectoriesAreFollowed() {
        #expect(journal(["\(Damon.kdamonds)/0", "\(Damon.kdamonds)/12"]).untrustedPath(stateDirectory: "/var/lib/memlab") == nil)
        for bad in ["\(Damon.kdamonds)/0/state", "\(Damon.kdamonds)/../../../../../etc", "\(Damon.kdamonds)/", "\(Damon.kdamonds)/-1",
                    "\(Damon.kdamonds)/99999", "/etc/passwd", "\(Damon.kdamonds)/0 ", "\(Damon.kdamonds)/x"] {
            #expect(journal([bad]).untrustedPath(stateDirectory: "/var/lib/memlab") == bad, "\(bad)")
        }
    }

    /// A kdamond index at or past nr_kdamonds is gone already (removed by hand, or the
    /// interface rebuilt): restore counts it as done and writes nothing.
    @Test(.enabled(if: Damon.isAvailable, "no DAMON sysfs admin interface"))
    func aKdamondAlreadyGoneIsRestored() throws {
        let n = Int((ProcFile.readIfPresent(Damon.nrKdamonds) ?? "0").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        let before = Damon.configured()
        let report = SettingsGuard.restore(journal(["\(Damon.kdamonds)/\(n + 3)"]))
        #expect(report.restored, "\(report.failures)")
        #expect(Damon.configured() == before, "nothing of DAMON changed")
    }

    @Test func thePictureShowsDamon() {
        guard Damon.isAvailable else { return }
        let lines = WatchedSettings.snapshot()
        let n = Damon.configured().count
        #expect(lines.contains("damon_kdamonds=\(n)"))
        for k in Damon.configured() { #expect(lines.contains("damon_kdamond_\(k.index)=\(k.state)")) }
    }
}
