import Foundation
import Testing

/// Every test that runs memlab against the kernel lives under this suite: `.serialized`
/// runs them one at a time, since KSM's counters and knobs are machine-wide.
@Suite(.serialized)
struct KernelTests {}
