use serde_json::json;

use super::*;

fn limits() -> AppLimits {
    AppLimits {
        memory_bytes: 8 * 1024 * 1024,
        time_ms: 200,
        instructions: 5_000_000,
        max_emits: 1000,
        max_doc_bytes: 64 * 1024,
    }
}

fn app(src: &str) -> AppHandle {
    let c = compile(src, &limits()).expect("app compiles");
    AppHandle::new(
        TenantName::parse("alice").expect("valid"),
        AppKind::Batch,
        1,
        c,
        limits(),
    )
}

fn map_one(a: &AppHandle, record: serde_json::Value) -> Outcome {
    a.map_records("f.csv", &[record])
        .pop()
        .expect("one outcome")
}

#[test]
fn map_transforms_records_with_conversion_rules() {
    let a = app(r#"
        function map(r)
            return { site = r["sample.samplingPoint.notation"], value = tonumber(r.result),
                     n = 3, half = 1.5, tags = {"a", "b"}, empty = {}, who = tenant, from = data_name }
        end"#);
    let out = map_one(
        &a,
        json!({"sample.samplingPoint.notation": "AN-1", "result": "7.25"}),
    );
    let docs = out.result.expect("ok");
    assert_eq!(docs.len(), 1);
    let d = serde_json::Value::Object(docs[0].1.clone());
    assert_eq!(
        d,
        json!({"site": "AN-1", "value": 7.25, "n": 3, "half": 1.5, "tags": ["a", "b"], "empty": {}, "who": "alice", "from": "f.csv"})
    );
    assert!(d["n"].is_i64(), "whole numbers become integers");
}

#[test]
fn map_may_drop_or_fan_out() {
    let a = app("function map(r) if r.skip then return nil end return {{x=1},{x=2}} end");
    assert!(
        map_one(&a, json!({"skip": true}))
            .result
            .expect("ok")
            .is_empty()
    );
    assert_eq!(map_one(&a, json!({})).result.expect("ok").len(), 2);
}

#[test]
fn ingest_emits_into_two_collections() {
    let a = app(r#"
        function ingest(tenant, name, data)
            for i, row in ipairs(parse_csv(data)) do
                emit("rows", row)
                if tonumber(row.v) > 1 then emit("big", {v = tonumber(row.v), t = tenant}) end
            end
            log("done " .. name)
        end"#);
    let out = a.ingest("x.csv", "k,v\na,1\nb,2\nc,3\n");
    let docs = out.result.expect("ok");
    assert_eq!(docs.len(), 5);
    assert_eq!(
        docs.iter()
            .filter(|(c, _)| c.as_deref() == Some("big"))
            .count(),
        2
    );
    assert_eq!(out.log.as_deref(), Some("done x.csv"));
}

#[test]
fn syntax_errors_give_the_line() {
    let e = compile("function map(r)\n  return {\nend", &limits()).expect_err("bad syntax");
    assert_eq!(e.line, Some(3), "{e:?}");
    let e = compile("x = 1", &limits()).expect_err("no entry point");
    assert!(e.message.contains("neither"), "{e:?}");
}

#[test]
fn runtime_errors_carry_the_tenant_line() {
    let a = app("function map(r)\n  local x = nil\n  return x.y\nend");
    let f = map_one(&a, json!({})).result.expect_err("fails");
    assert!(f.reason.contains("app:3"), "{}", f.reason);
    assert!(!f.limit);
}

#[test]
fn endless_loop_hits_a_named_limit_and_the_next_call_works() {
    let a = app("function map(r) if r.loop then while true do end end return {ok=true} end");
    let f = map_one(&a, json!({"loop": true}))
        .result
        .expect_err("stopped");
    assert!(f.limit);
    assert!(
        f.reason.contains("time limit") || f.reason.contains("instruction budget"),
        "{}",
        f.reason
    );
    assert!(
        map_one(&a, json!({})).result.is_ok(),
        "a fresh VM serves the next record"
    );
}

#[test]
fn deep_recursion_and_memory_bombs_are_stopped() {
    let a = app("local function f(n) return f(n + 1) + 1 end function map(r) return f(1) end");
    let f = map_one(&a, json!({})).result.expect_err("stopped");
    assert!(
        f.reason.contains("stack overflow") || f.reason.contains("limit"),
        "{}",
        f.reason
    );

    let a = app("function map(r) local s = 'x' while true do s = s .. s end end");
    let f = map_one(&a, json!({})).result.expect_err("stopped");
    assert!(
        f.reason.contains("memory limit") || f.reason.contains("time limit"),
        "{}",
        f.reason
    );

    let a = app("function map(r) local t = {} for i = 1, 1e9 do t[i] = {i} end end");
    let f = map_one(&a, json!({})).result.expect_err("stopped");
    assert!(f.limit, "{}", f.reason);
}

#[test]
fn escape_attempts_find_nothing() {
    for src in [
        "function map(r) os.execute('id') end",
        "function map(r) io.open('/etc/passwd') end",
        "function map(r) require('x') end",
        "function map(r) loadstring('return 1')() end",
        "function map(r) getfenv(0).x = 1 end",
        "function map(r) debug.traceback() end",
        "function map(r) print('x') end",
    ] {
        let a = app(src);
        let f = map_one(&a, json!({})).result.expect_err(src);
        assert!(f.reason.contains("app error"), "{src}: {}", f.reason);
    }
}

#[test]
fn only_pure_globals_remain_after_sandboxing() {
    let a = app(r#"
        function map(r)
            local names = {}
            for k in pairs(getmetatable(_G) and getmetatable(_G).__index or _G) do table.insert(names, k) end
            for k in pairs(_G) do table.insert(names, k) end
            table.sort(names)
            return { names = names }
        end"#);
    let docs = map_one(&a, json!({})).result.expect("ok");
    let names: Vec<String> = docs[0].1["names"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for banned in [
        "os",
        "io",
        "require",
        "loadstring",
        "getfenv",
        "setfenv",
        "print",
        "debug",
        "load",
        "dofile",
        "collectgarbage",
    ] {
        assert!(
            !names.iter().any(|n| n == banned),
            "{banned} is reachable: {names:?}"
        );
    }
    for needed in [
        "emit",
        "parse_json",
        "parse_csv",
        "log",
        "string",
        "table",
        "math",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} missing: {names:?}"
        );
    }
}

#[test]
fn a_million_emits_stop_at_the_limit() {
    let a = app("function ingest(t, n, d) for i = 1, 1000000 do emit({i = i}) end end");
    let f = a.ingest("x", "").result.expect_err("stopped");
    assert!(
        f.reason.contains("1000 emitted documents limit"),
        "{}",
        f.reason
    );
}

#[test]
fn invalid_documents_fail_the_record() {
    let a = app("function map(r) return {bad = 0/0} end");
    let f = map_one(&a, json!({})).result.expect_err("nan");
    assert!(f.reason.contains("invalid document"), "{}", f.reason);
    let a = app("function map(r) return {f = function() end} end");
    assert!(map_one(&a, json!({})).result.is_err());
    let a = app("function map(r) return 'text' end");
    assert!(map_one(&a, json!({})).result.is_err());
}

#[test]
fn json_null_and_arrays_round_trip() {
    let a = app("function map(r) return r end");
    let v = json!({"a": null, "b": [1, 2, {"c": []}], "d": {"e": "f"}, "n": -3});
    let docs = map_one(&a, v).result.expect("ok");
    assert_eq!(
        serde_json::Value::Object(docs[0].1.clone()),
        json!({"a": null, "b": [1, 2, {"c": []}], "d": {"e": "f"}, "n": -3})
    );
}

#[test]
fn transform_without_app_stores_objects_and_fails_the_rest() {
    let inputs: Vec<Input> = [
        Ok(json!({"a": 1})),
        Ok(json!([1])),
        Err("line 3: bad".to_owned()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, value)| Input {
        origin: "h".into(),
        index: i as u64,
        bytes: 5,
        started_us: 0,
        data_name: "f".into(),
        value,
    })
    .collect();
    let t = transform(None, "c", 1000, &inputs);
    assert_eq!(t.docs.len(), 1);
    assert_eq!(t.docs[0].id, "h:0");
    assert_eq!(t.failed_inputs.len(), 2);
    assert_eq!(t.failures[1].reason, "line 3: bad");
}

mod fuzz {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::super::{json_to_lua, lua_to_json};

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(Value::from),
            (-1e9f64..1e9)
                .prop_filter("fractional", |f| f.fract() != 0.0)
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_][a-z0-9_.]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_survives_the_trip_through_luau(v in json()) {
            let lua = mlua::Lua::new();
            let l = json_to_lua(&lua, &v).expect("to lua");
            let back = lua_to_json(&lua, &l, 0).expect("from lua");
            prop_assert_eq!(back, v);
        }

        #[test]
        fn any_number_converts_by_the_documented_rules(n in any::<f64>()) {
            let lua = mlua::Lua::new();
            let r = lua_to_json(&lua, &mlua::Value::Number(n), 0);
            if !n.is_finite() {
                prop_assert!(r.is_err());
            } else if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                prop_assert_eq!(r.expect("whole").as_i64(), Some(n as i64));
            } else {
                prop_assert_eq!(r.expect("double").as_f64(), Some(n));
            }
        }
    }
}
