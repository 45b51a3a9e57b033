"""GrammarSpec keeps a JSON schema as given: xgrammar generates its properties in the schema's own order."""
import json

from mtpx.engine.constraints import GrammarSpec


def test_json_schema_keeps_property_order():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}}}
    assert list(json.loads(GrammarSpec.json_schema(schema).source)["properties"]) == ["name", "arguments"]
    assert list(json.loads(GrammarSpec.json_schema(json.dumps(schema)).source)) == ["type", "properties"]
