import LabKit
import LazyRestore
import Migration

/// Every scenario memlab knows. The order is the order of `memlab list`.
public let allScenarios = Registry([
    KSMScenario(),
    HugePagesScenario(),
    OvercommitScenario(),
    TmemScenario(),
    ReclaimScenario(),
    LazyRestoreScenario(),
    MigrationScenario(),
    VMScenario(),
    SelfTestScenario(),
])
