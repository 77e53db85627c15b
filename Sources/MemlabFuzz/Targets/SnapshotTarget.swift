#if canImport(Glibc)
import Glibc
#endif
import Scenarios
import Transfer

/// A snapshot file as `memlab migrate check` reads it: `Snapshot.inspect` (prefix, header
/// text through `ImageHeader.parse`, lengths against the file size, the streamed checksum)
/// over memory standing for a file, then the compatibility verdict against a fixed machine.
///
/// Input: u64 `extra`, a flags byte (bit 0: verify the data), then the file's first bytes.
/// The file's size is their count plus `extra` (saturating): a claimed size the bytes do not
/// reach is a short read, as from a file that shrank. Accepted: the snapshot is valid.
extension FuzzTarget {
    static let snapshot = FuzzTarget(name: "snapshot", maxLen: 1 << 16,
                                     summary: "snapshot file: Snapshot.inspect + ImageHeader.parse + compatibility") { data in
        var r = FuzzBytes(data)
        let extra = r.u64()
        let verify = r.u8() & 1 == 1
        let file = r.rest()
        let (sum, overflow) = file.count.addingReportingOverflow(Int(clamping: extra))
        let size = overflow ? Int.max : sum
        do {
            let (header, offset) = try Snapshot.inspect(Snapshot.MemoryBytes(data: file, size: size), verifyData: verify)
            // What `inspect` promises: the page data ends exactly at the end of the file.
            fuzzInvariant(offset >= 16 && offset - 16 <= Snapshot.maxHeader && size - offset == header.regionBytes,
                          "offset \(offset) + \(header.regionBytes) bytes of data in a \(size)-byte file")
            fuzzInvariant(header.regionBytes > 0 && header.regionBytes % header.pageSize == 0, "region_bytes \(header.regionBytes)")
            _ = header.compatibility(with: MigrationFuzz.local)
            _ = header.encode()
            return true
        } catch {
            _ = "\(error)"
            return false
        }
    }
}
