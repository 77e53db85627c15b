#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

extension KernelTests {
    /// `memlab probe` must tell the truth: every answer is compared with the kernel's own
    /// files read here independently.
    @Suite struct ProbeTruth {
        @Test func probeMatchesTheKernel() throws {
            let dir = TempDir()
            let out = try Memlab.run(["probe", "--json"], stateDir: dir.path)
            #expect(out.status == 0)
            let json = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any])
            let host = try #require(json["host"] as? [String: Any])
            #expect(host["cpus"] as? Int == Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
            #expect(host["page_size"] as? Int == Int(sysconf(Int32(_SC_PAGESIZE))))
            let meminfo = try String(contentsOfFile: "/proc/meminfo", encoding: .utf8)
            let memTotalKB = meminfo.split(separator: "\n").first { $0.hasPrefix("MemTotal:") }!.split(separator: " ")[1]
            #expect(host["memory_bytes"] as? Int == Int(memTotalKB)! * 1024)
            let cpuinfo = try String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)
            #expect(host["virtualized"] as? Bool == cpuinfo.contains(" hypervisor"))
            var uts = utsname()
            uname(&uts)
            let release = withUnsafePointer(to: uts.release) { $0.withMemoryRebound(to: CChar.self, capacity: 65) { String(cString: $0) } }
            #expect(host["kernel"] as? String == release)

            let features = try #require(json["features"] as? [[String: Any]])
            func feature(_ name: String) -> [String: Any]? { features.first { $0["name"] as? String == name } }
            #expect((feature("ksm")?["usable"] as? Bool) == (hasKSM && isRoot))
            // One entry per hugetlb pool size the kernel has.
            let pools = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/kernel/mm/hugepages")) ?? []
            #expect(features.filter { ($0["name"] as? String ?? "").hasPrefix("hugetlb-") }.count == pools.count)
            // One entry per THP size directory.
            let sizes = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/kernel/mm/transparent_hugepage")) ?? []).filter { $0.hasPrefix("hugepages-") }
            #expect(features.filter { ($0["name"] as? String ?? "").hasPrefix("mthp-") }.count == sizes.count)
            let swaps = try String(contentsOfFile: "/proc/swaps", encoding: .utf8).split(separator: "\n").count - 1
            #expect((feature("swap")?["usable"] as? Bool) == (swaps > 0))
            #expect(feature("soft-dirty") != nil)
            #expect(feature("userfaultfd") != nil)
            if feature("userfaultfd")?["usable"] as? Bool == true {
                #expect((feature("userfaultfd")?["detail"] as? String ?? "").contains("missing_shmem"))
            }
        }

        @Test func listNamesEveryVariant() throws {
            let dir = TempDir()
            let out = try Memlab.run(["list", "--json"], stateDir: dir.path)
            #expect(out.status == 0)
            let list = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [[String: Any]])
            let ksm = try #require(list.first { $0["id"] as? String == "ksm" })
            let variants = (ksm["variants"] as? [[String: Any]])?.compactMap { $0["name"] as? String }
            #expect(variants == ["merge", "cow", "unmerge", "smart-scan", "advisor", "thp", "numa-merge", "chains"])
            let params = (ksm["parameters"] as? [[String: Any]])?.compactMap { $0["name"] as? String } ?? []
            #expect(params.contains("pages_to_scan"))
            let plain = try Memlab.run(["list"], stateDir: dir.path)
            #expect(plain.stdout.contains("ksm:cow"))
        }
    }
}
