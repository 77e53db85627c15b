import LabKit
import Scenarios
import Testing

/// Every built-in scenario declares its variants and parameters typed, once: names unique,
/// each default accepted by its own declaration, and every variant resolves its defaults
/// through the typed validate (which decodes every parameter).
@Suite struct ScenarioDeclarations {
    @Test(arguments: allScenarios.scenarios.map(\.id))
    func declarationsHold(id: String) throws {
        let s = try #require(allScenarios.scenario(id))
        #expect(s is any TypedScenario)
        let names = s.parameters.map(\.name)
        #expect(!names.isEmpty)
        #expect(Set(names).count == names.count, "parameter names are unique")
        for spec in s.parameters { _ = try spec.accept(spec.defaultValue) }
        #expect(Set(s.parameterUnits.keys) == Set(names))
        let variants = s.variants.map(\.name)
        #expect(Set(variants).count == variants.count)
        for v in variants {
            let params = try s.resolve(variant: v, overrides: [:])
            try s.check(variant: v, params: params)
        }
    }
}
