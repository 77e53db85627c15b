import LinuxMM

extension ProbeReport {
    /// KSM's newer mechanisms, one row each (the ksm variants of the same names): present in
    /// this kernel's /sys/kernel/mm/ksm or not, and what the machine lacks for them.
    static func ksmMechanisms(root: Bool) -> [Feature] {
        guard KSM.isAvailable else { return [] }
        let needRoot = root ? nil : "changing its settings needs root"
        func value(_ name: String) -> String? {
            ProcFile.readIfPresent("\(KSM.directory)/\(name)").map { Knob.effectiveValue(of: $0) }
        }
        func row(_ name: String, _ files: [String], minimum: String, detail: () -> String, extra: String? = nil) -> Feature {
            if let missing = files.first(where: { value($0) == nil }) {
                return Feature(name: name, usable: false, detail: "", reason: "\(KSM.directory)/\(missing) missing: needs Linux \(minimum)")
            }
            if let extra { return Feature(name: name, usable: false, detail: detail(), reason: extra) }
            return Feature(name: name, usable: root, detail: detail(), reason: needRoot)
        }
        var f: [Feature] = []
        f.append(row("ksm-smart-scan", ["smart_scan", "pages_skipped", "pages_scanned"], minimum: "6.7+") {
            "smart_scan=\(value("smart_scan") ?? "?") pages_skipped=\(value("pages_skipped") ?? "?")"
        })
        f.append(row("ksm-advisor", ["advisor_mode", "advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan"], minimum: "6.9+") {
            "advisor_mode=\(value("advisor_mode") ?? "?") target_scan_time=\(value("advisor_target_scan_time") ?? "?") s max_cpu=\(value("advisor_max_cpu") ?? "?")% pages_to_scan \(value("advisor_min_pages_to_scan") ?? "?")..\(value("advisor_max_pages_to_scan") ?? "?")"
        })
        if THP.isAvailable {
            f.append(row("ksm-thp", ["run"], minimum: "2.6.32+") { "THP enabled=\((try? THP.enabled.read()) ?? "?"): merging splits huge pages (thp_split_page)" })
        } else {
            f.append(Feature(name: "ksm-thp", usable: false, detail: "", reason: "/sys/kernel/mm/transparent_hugepage missing: kernel built without CONFIG_TRANSPARENT_HUGEPAGE"))
        }
        let nodes = NUMA.nodeCount
        f.append(row("ksm-numa-merge", ["merge_across_nodes"], minimum: "3.9+ with CONFIG_NUMA",
                     detail: { "merge_across_nodes=\(value("merge_across_nodes") ?? "?"), \(nodes) NUMA node(s)" },
                     extra: nodes >= 2 ? nil : "needs two NUMA nodes; this machine has \(nodes) (run it in a guest with two nodes)"))
        f.append(row("ksm-chains", ["max_page_sharing", "stable_node_chains", "stable_node_dups"], minimum: "4.13+") {
            "max_page_sharing=\(value("max_page_sharing") ?? "?") stable_node_chains=\(value("stable_node_chains") ?? "?")"
        })
        return f
    }
}
