use serde_json::json;

use super::*;
use crate::config::AppLimits;
use crate::model::AppKind;
use crate::tenants::TenantName;

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
    app_with(src, limits())
}

fn app_with(src: &str, limits: AppLimits) -> AppHandle {
    let c = compile(src, &limits).expect("app compiles");
    AppHandle::new(
        TenantName::parse("alice").expect("valid"),
        AppKind::Batch,
        1,
        c,
        limits,
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
fn records_reach_map_as_they_are_whatever_their_keys_from_one_record_to_the_next() {
    // The VM keeps the last record's keys, and its short string values: records whose keys
    // or values change, repeat, move, change type, grow past what is kept (in number and in
    // length) or nest must still arrive exactly as sent.
    let long = "k".repeat(100);
    let long_value = "v".repeat(65);
    let many: serde_json::Map<String, serde_json::Value> =
        (0..80).map(|i| (format!("f{i:02}"), json!(i))).collect();
    let records = [
        json!({"a": "1", "b": "2", "c": "3"}),
        json!({"a": "1", "b": "2", "c": "3"}),
        json!({"b": "x", "a": "y"}),
        json!({"a": "1", long.clone(): "long", "c": {"d": [1, "e", null, {}], "a": []}}),
        serde_json::Value::Object(many),
        json!({"a": 1.5, "b": true, "c": null, long: "again", "z": "last"}),
        json!({}),
        json!({"a": "1", "b": "2", "c": "3"}),
        json!({"a": "v", "b": "w"}),
        json!({"a": "v", "b": "w"}),
        json!({"a": "v", "b": "w"}),
        json!({"a": 1, "b": "w"}),
        json!({"a": "v", "b": "w"}),
        json!({"a": "v", "b": "w", "c": "w"}),
        json!({"b": "v", "a": "w"}),
        json!({"a": "", "b": ""}),
        json!({"a": "", "b": null}),
        json!({"a": "", "b": ""}),
        json!({"a": long_value.clone(), "b": [long_value.clone()]}),
        json!({"a": long_value.clone(), "b": "w"}),
        json!({"a": "v", "b": "w"}),
    ];
    let a = app("function map(r) return { r = r } end");
    let out = a.map_records("f.csv", &records);
    assert_eq!(out.len(), records.len());
    for (o, r) in out.into_iter().zip(&records) {
        let docs = o.result.expect("mapped");
        assert_eq!(
            docs,
            [(
                None,
                json!({ "r": r }).as_object().cloned().expect("object")
            )]
        );
    }
}

#[test]
fn documents_keep_their_keys_exactly_call_after_call() {
    // The VM remembers the keys of the documents `map` returned, by the identity of their
    // strings: keys that change, are made anew at each call (more of them than are kept),
    // start with `$` after a valid one, or are the record's own must still arrive exactly,
    // and be checked.
    let a = app(r#"
        local n = 0
        function map(r)
            n = n + 1
            if r.kind == "fresh" then return { ["k" .. n] = n, same = 1 } end
            if r.kind == "dollar" then return { ["$" .. r.key] = 1 } end
            if r.kind == "copy" then
                local o = {}
                for k, v in pairs(r) do o[k] = v end
                return o
            end
            return { a = 1, [r.key] = 2 }
        end"#);
    let mut records: Vec<serde_json::Value> = (0..70).map(|_| json!({"kind": "fresh"})).collect();
    records.extend([
        json!({"kind": "x", "key": "b"}),
        json!({"kind": "x", "key": "a"}),
        json!({"kind": "x", "key": "b"}),
        json!({"kind": "dollar", "key": "a"}),
        json!({"kind": "x", "key": "b"}),
        json!({"kind": "copy", "z": "1", "y": "2"}),
        json!({"kind": "copy", "y": "2", "z": "1"}),
    ]);
    let out = a.map_records("f.csv", &records);
    let doc = |i: usize| match &out[i].result {
        Ok(docs) if docs.len() == 1 => serde_json::Value::Object(docs[0].1.clone()),
        other => panic!("record {i}: {other:?}"),
    };
    for i in 0..70 {
        let n = i + 1;
        assert_eq!(
            doc(i),
            json!({ format!("k{n}"): n, "same": 1 }),
            "record {i}"
        );
    }
    assert_eq!(doc(70), json!({"a": 1, "b": 2}));
    assert_eq!(doc(71), json!({"a": 2}));
    assert_eq!(doc(72), json!({"a": 1, "b": 2}));
    let f = out[73].result.as_ref().expect_err("a `$` key");
    assert!(f.reason.contains("not allowed"), "{}", f.reason);
    assert_eq!(doc(74), json!({"a": 1, "b": 2}));
    assert_eq!(doc(75), records[75]);
    assert_eq!(doc(76), records[76]);
}

#[test]
fn a_kept_key_is_the_string_it_was_even_after_the_vms_garbage_is_collected() {
    // Keys made anew at each call, each call's garbage collected before the next: a string
    // at the address of one kept before must not be taken for it.
    let a = app(r#"
        local n = 0
        function map(r) n = n + 1 return { [string.rep("k", 1 + n % 3) .. n] = n } end"#);
    for i in 1..=200usize {
        let out = map_one(&a, json!({}));
        let docs = out.result.expect("mapped");
        let want = format!("{}{i}", "k".repeat(1 + i % 3));
        assert_eq!(
            serde_json::Value::Object(docs[0].1.clone()),
            json!({ want: i }),
            "call {i}"
        );
        for vm in a.pool.lock().expect("pool").iter() {
            vm.lua.gc_collect().expect("collect");
        }
    }
}

#[test]
fn kept_keys_are_checked_and_counted_as_the_first_time() {
    // A refused key is refused every time; a key with escapes counts as written, every time.
    let a = app(r#"function map(r) return { [r.key] = 1 } end"#);
    for key in ["$set", "a\u{0}b", "$set", "a\u{0}b"] {
        let f = map_one(&a, json!({ "key": key })).result.expect_err(key);
        assert!(f.reason.contains("not allowed"), "{key}: {}", f.reason);
    }
    // {"a\"b":"…"} is 11 bytes around the string.
    let a = app(r#"function map(r) return { ['a"b'] = string.rep('x', r.n) } end"#);
    for _ in 0..2 {
        assert!(map_one(&a, json!({"n": 65536 - 11})).result.is_ok());
        assert_limit(
            "one byte over, the key kept",
            &map_one(&a, json!({"n": 65536 - 10})),
            "65536 bytes document limit",
        );
    }
}

#[test]
fn a_record_larger_than_the_memory_limit_fails_on_it_and_the_next_record_is_served() {
    let a = app("function map(r) return { n = #r.s } end");
    let huge = json!({ "s": "x".repeat(limits().memory_bytes + 1) });
    let f = map_one(&a, huge).result.expect_err("over the limit");
    assert!(f.limit, "{}", f.reason);
    assert!(f.reason.contains("memory limit"), "{}", f.reason);
    // Under the limit but without room to convert unmetered: converted metered, and served.
    let big = "x".repeat(limits().memory_bytes / 2);
    let out = a.map_records("f.csv", &[json!({ "s": big }), json!({ "s": "xy" })]);
    let n = |o: &Outcome| o.result.as_ref().map(|d| d[0].1["n"].clone()).ok();
    assert_eq!(n(&out[0]), Some(json!(limits().memory_bytes / 2)));
    assert_eq!(n(&out[1]), Some(json!(2)));
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
        "coroutine",
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
fn number_keys_name_one_integer_and_never_collide_in_silence() {
    // Whole numbers are keys as the decimal text of their exact value, up to ±2^63.
    let a = app(
        "function map(r) return {[3] = 'a', [-7] = 'b', x = 1, [2^53 + 2] = 'c', [-2^63] = 'd', [-0] = 'e'} end",
    );
    let docs = map_one(&a, json!({})).result.expect("ok");
    assert_eq!(
        serde_json::Value::Object(docs[0].1.clone()),
        json!({"3": "a", "-7": "b", "x": 1, "9007199254740994": "c", "-9223372036854775808": "d", "0": "e"})
    );
    // Values alike: a whole number within ±2^63 is its exact integer, past it a double.
    let a = app("function map(r) return {big = 2^60, huge = 2^64} end");
    let docs = map_one(&a, json!({})).result.expect("ok");
    assert_eq!(docs[0].1["big"], json!(1_152_921_504_606_846_976_i64));
    assert!(docs[0].1["big"].is_i64());
    assert!(docs[0].1["huge"].is_f64());
    // A fraction, or a whole number past what a 64-bit integer holds: refused, not saturated
    // to i64::MAX.
    for key in [
        "2^63",
        "1e19",
        "-1e300",
        "0.5",
        "-2.5",
        "math.huge",
        "-math.huge",
    ] {
        let a = app(&format!(
            "function map(r) return {{[{key}] = 1, x = 2}} end"
        ));
        let f = map_one(&a, json!({})).result.expect_err(key);
        assert!(f.reason.contains("invalid document"), "{key}: {}", f.reason);
        assert!(!f.limit, "{key}: an invalid document keeps its VM");
    }
    // A number key and a string key with the same text (tables that are not arrays): the
    // record fails with the key named, whichever the walk meets first, in a document or nested.
    for src in [
        "return {[1] = 'n', ['1'] = 's'}",
        "return {['1'] = 's', [1] = 'n', x = 0}",
        "return {inner = {[10] = 1, ['10'] = 2}}",
        "return {{[5] = 1, ['5'] = 2}}",
    ] {
        let a = app(&format!("function map(r) {src} end"));
        for _ in 0..2 {
            let f = map_one(&a, json!({})).result.expect_err(src);
            assert!(f.reason.contains("appears twice"), "{src}: {}", f.reason);
            assert!(!f.limit, "{src}");
        }
    }
    // The same through `emit`.
    let a = app("function ingest(t, n, d) emit({[2] = 1, ['2'] = 1}) end");
    let f = a.ingest("f", "").result.expect_err("emit");
    assert!(f.reason.contains("appears twice"), "{}", f.reason);
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

/// Runs `f` on its own thread and waits at most `secs` for it: an attack that is not stopped
/// fails the test instead of hanging it. Prints how long the attack held the thread.
fn within<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let out = rx
        .recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: not stopped within {secs} s"));
    eprintln!("{what}: stopped after {:?}", started.elapsed());
    out
}

/// `src`'s `map` on one record, on its own thread, bounded by 20 s.
fn attack_map(what: &str, src: &'static str, record: serde_json::Value) -> Outcome {
    within(what, 20, move || map_one(&app(src), record))
}

fn assert_limit(what: &str, out: &Outcome, reason: &str) {
    let f = out.result.as_ref().expect_err(what);
    assert!(
        f.reason.contains(reason),
        "{what}: reason was `{}`",
        f.reason
    );
}

#[test]
fn shared_references_cannot_make_output_past_the_document_limit() {
    // 1000 references to one 1 MB string: 1 GB of JSON outside the VM.
    let out = attack_map(
        "shared string",
        r#"local s = string.rep("x", 1e6)
           function map(r) local t = {} for i = 1, 1000 do t[i] = s end return {a = t} end"#,
        json!({}),
    );
    assert_limit("shared string", &out, "65536 bytes document limit");
    // A few KB in the VM, 2^40 nodes once converted.
    let out = attack_map(
        "shared table",
        r#"function map(r) local t = {1} for i = 1, 40 do t = {t, t} end return {x = t} end"#,
        json!({}),
    );
    assert_limit("shared table", &out, "65536 bytes document limit");
    // The same as a list of documents.
    let out = attack_map(
        "shared docs",
        r#"function map(r) local s = string.rep("x", 60000) local d = {s = s} local l = {}
           for i = 1, 1000 do l[i] = d end return l end"#,
        json!({}),
    );
    assert_limit(
        "shared docs",
        &out,
        "bytes memory limit (the JSON of all documents",
    );
    let out = attack_map(
        "long list",
        "function map(r) local d = {} local l = {} for i = 1, 1001 do l[i] = d end return l end",
        json!({}),
    );
    assert_limit("long list", &out, "1000 emitted documents limit");
}

#[test]
fn shared_references_cannot_be_emitted_past_the_limits_even_under_pcall() {
    for (what, src, reason) in [
        (
            "emit shared string",
            r#"function ingest(t, n, d) local s = string.rep("x", 1e6) local l = {}
               for i = 1, 1000 do l[i] = s end emit({a = l}) end"#,
            "65536 bytes document limit",
        ),
        (
            "emit shared table",
            r#"function ingest(t, n, d) local x = {1} for i = 1, 40 do x = {x, x} end emit("c", {x = x}) end"#,
            "65536 bytes document limit",
        ),
        (
            "caught emit of a bomb",
            r#"function ingest(t, n, d) local x = {1} for i = 1, 40 do x = {x, x} end
               pcall(emit, {x = x}) emit({ok = true}) end"#,
            "65536 bytes document limit",
        ),
        (
            "caught, then returns",
            r#"function ingest(t, n, d) local x = {1} for i = 1, 40 do x = {x, x} end
               pcall(emit, {x = x}) end"#,
            "65536 bytes document limit",
        ),
        (
            "many emits of one big string",
            r#"function ingest(t, n, d) local s = string.rep("x", 60000)
               for i = 1, 100000 do emit({s = s}) end end"#,
            "bytes memory limit (the JSON of all documents",
        ),
    ] {
        let out = within(what, 20, move || app(src).ingest("x", ""));
        assert_limit(what, &out, reason);
        assert!(
            out.result.expect_err(what).limit,
            "{what}: the VM is discarded"
        );
    }
}

#[test]
fn document_size_is_counted_as_its_json_and_the_limit_is_exact() {
    // {"s":"…"} is 8 bytes around the string.
    let a = app("function map(r) return {s = string.rep('x', r.n)} end");
    assert!(map_one(&a, json!({"n": 65536 - 8})).result.is_ok());
    assert_limit(
        "one byte over",
        &map_one(&a, json!({"n": 65536 - 7})),
        "65536 bytes document limit",
    );
    // Escapes count as written: a newline is two bytes, a control character six.
    let a = app("function map(r) return {s = string.rep(r.c, r.n)} end");
    assert!(
        map_one(&a, json!({"c": "\n", "n": (65536 - 8) / 2}))
            .result
            .is_ok()
    );
    assert!(
        map_one(&a, json!({"c": "\n", "n": (65536 - 8) / 2 + 1}))
            .result
            .is_err()
    );
    assert!(
        map_one(&a, json!({"c": "\u{1}", "n": (65536 - 8) / 6}))
            .result
            .is_ok()
    );
    assert!(
        map_one(&a, json!({"c": "\u{1}", "n": (65536 - 8) / 6 + 1}))
            .result
            .is_err()
    );
}

#[test]
fn cycles_are_rejected() {
    let a = app("function map(r) local t = {} t.self = t return t end");
    let f = map_one(&a, json!({})).result.expect_err("cycle");
    assert!(f.reason.contains("nesting deeper than 64"), "{}", f.reason);
    let a = app("function ingest(t, n, d) local x = {} x[1] = x x[2] = x emit({x = x}) end");
    let f = a.ingest("x", "").result.expect_err("cycle");
    assert!(
        f.reason.contains("nesting deeper than 64") || f.reason.contains("document limit"),
        "{}",
        f.reason
    );
}

#[test]
fn pcall_cannot_catch_the_time_limit() {
    for (what, src) in [
        (
            "pcall in a loop",
            "function map(r) while true do pcall(function() while true do end end) end end",
        ),
        (
            "pcall, then return",
            "function map(r) pcall(function() while true do end end) return {ok = true} end",
        ),
        (
            "nested pcalls",
            "function map(r) pcall(function() while true do pcall(function() while true do end end) end end) return {} end",
        ),
        (
            "xpcall with a looping handler",
            "function map(r) while true do xpcall(function() while true do end end, function(e) while true do end end) end end",
        ),
        (
            "xpcall whose handler swallows",
            "function map(r) xpcall(function() while true do end end, function(e) return 'fine' end) return {} end",
        ),
        (
            "error object whose __tostring loops",
            "function map(r) error(setmetatable({}, {__tostring = function() while true do end end})) end",
        ),
        (
            "caught error object, tostring loops",
            "function map(r) local ok, e = pcall(error, setmetatable({}, {__tostring = function() while true do end end})) return {e = tostring(e)} end",
        ),
        (
            "recursive pcall",
            "local function f() while true do pcall(f) end end function map(r) pcall(f) return {} end",
        ),
    ] {
        let out = attack_map(what, src, json!({}));
        // (mlua calls `__tostring` to describe an error object: still inside the budget.)
        let f = out.result.expect_err(what);
        assert!(
            f.reason.contains("200 ms time limit") || f.reason.contains("instruction budget"),
            "{what}: reason was `{}`",
            f.reason
        );
        assert!(f.limit, "{what}");
    }
}

#[test]
fn pcall_cannot_catch_the_memory_limit() {
    for (what, src) in [
        (
            "caught memory error",
            "function map(r) pcall(function() local t = {} for i = 1, 1e9 do t[i] = {i} end end) return {ok = true} end",
        ),
        (
            "caught string growth",
            "function map(r) local ok = pcall(function() local s = 'x' while true do s = s .. s end end) return {ok = ok} end",
        ),
        (
            "caught string.rep",
            "function map(r) pcall(string.rep, 'x', 2^29) return {} end",
        ),
        (
            "caught parse_json",
            "function map(r) pcall(parse_json, '[' .. string.rep('0,', 1e6) .. '0]') return {} end",
        ),
        (
            "caught table.move",
            "function map(r) pcall(table.move, {}, 1, 2^30, 2^30 + 1) return {} end",
        ),
    ] {
        // Memory must be what stops them: in a debug build on a loaded machine some take
        // longer than the usual 200 ms, so the time limit is set out of the way.
        let generous = AppLimits {
            time_ms: 10_000,
            ..limits()
        };
        let out = within(what, 20, move || {
            map_one(&app_with(src, generous), json!({}))
        });
        assert_limit(what, &out, "8388608 bytes memory limit");
        assert!(out.result.expect_err(what).limit);
    }
}

#[test]
fn a_vm_that_hit_a_limit_is_discarded() {
    let a = app(r#"
        local calls = 0
        function map(r)
            calls = calls + 1
            if r.loop then pcall(function() while true do end end) end
            return {calls = calls}
        end"#);
    let calls = |o: Outcome| o.result.expect("ok")[0].1["calls"].as_i64();
    assert_eq!(calls(map_one(&a, json!({}))), Some(1));
    assert_eq!(calls(map_one(&a, json!({}))), Some(2), "the VM is reused");
    assert_eq!(a.pool.lock().expect("pool").len(), 1);
    assert_limit("loop", &map_one(&a, json!({"loop": true})), "time limit");
    assert_eq!(
        a.pool.lock().expect("pool").len(),
        0,
        "not returned to the pool"
    );
    assert_eq!(calls(map_one(&a, json!({}))), Some(1), "a fresh VM");
}

#[test]
fn a_quiet_apps_vms_are_dropped_and_its_next_call_builds_one_again() {
    let a = app(r#"
        local calls = 0
        function map(r)
            calls = calls + 1
            return {calls = calls}
        end"#);
    let calls = |o: Outcome| o.result.expect("ok")[0].1["calls"].as_i64();
    assert_eq!(calls(map_one(&a, json!({}))), Some(1));
    assert_eq!(
        a.drop_idle_vms(std::time::Duration::from_secs(60)),
        0,
        "a VM used just now stays"
    );
    assert_eq!(calls(map_one(&a, json!({}))), Some(2), "the VM is reused");
    assert_eq!(a.drop_idle_vms(std::time::Duration::ZERO), 1);
    assert_eq!(a.pool.lock().expect("pool").len(), 0);
    assert_eq!(calls(map_one(&a, json!({}))), Some(1), "a fresh VM");
}

#[test]
fn backtracking_patterns_are_stopped_by_the_time_limit() {
    for (what, src) in [
        (
            "string.find",
            r#"function map(r) return {i = string.find(string.rep("a", 5000), ".-.-.-.-.-.-.-.-b")} end"#,
        ),
        (
            ":match",
            r#"function map(r) local s = string.rep("a", 5000) return {m = s:match(".-.-.-.-.-.-.-.-b")} end"#,
        ),
        (
            "gmatch",
            r#"function map(r) for m in string.gmatch(string.rep("a", 5000), ".-.-.-.-.-.-.-.-b") do end return {} end"#,
        ),
        (
            ":gsub under pcall",
            r#"function map(r) local s = string.rep("a", 5000)
               while true do pcall(s.gsub, s, ".-.-.-.-.-.-.-.-b", "") end end"#,
        ),
        (
            "one step per character",
            r#"function map(r) local s = string.rep("a", 3e6) while true do s:find(".*.*.*b") end end"#,
        ),
    ] {
        let out = attack_map(what, src, json!({}));
        assert_limit(what, &out, "200 ms time limit");
    }
}

#[test]
fn quadratic_plain_searches_run_in_linear_time() {
    // Luau's plain search compares the needle at every position: minutes for these. Room
    // for the strings, and time for the unoptimised test build to search them.
    let roomy = AppLimits {
        memory_bytes: 64 * 1024 * 1024,
        time_ms: 10_000,
        ..limits()
    };
    let out = within("plain find", 20, move || {
        let a = app_with(
            r#"function map(r)
                local s = string.rep("a", 8e6)
                local p = string.rep("a", 2e6) .. "b"
                return {plain = string.find(s, p, 1, true) or 0, nospecials = s:find(p) or 0,
                        found = (s .. p):find(p, 5, true), split = #string.split(s .. "c" .. s, p)}
            end"#,
            roomy,
        );
        map_one(&a, json!({}))
    });
    let d = &out.result.expect("linear searches finish")[0].1;
    assert_eq!(
        (&d["plain"], &d["nospecials"], &d["found"], &d["split"]),
        (&json!(0), &json!(0), &json!(8_000_001), &json!(1))
    );
    let a = app_with(
        r#"function map(r) local s = string.rep("ab", 2e6)
        local parts = string.split(s .. "XYZ" .. s .. "XYZ", "XYZ")
        return {n = #parts, a = #parts[1], c = parts[3]} end"#,
        roomy,
    );
    let d = &map_one(&a, json!({})).result.expect("split")[0].1;
    assert_eq!(
        (&d["n"], &d["a"], &d["c"]),
        (&json!(3), &json!(4_000_000), &json!(""))
    );
}

#[test]
fn guarded_builtins_keep_their_meaning() {
    let a = app(r#"function map(r)
        local s = "hello world, hello"
        local a, b = s:find("hello", 2, true)
        local c, d = string.find(s, "o w")
        local e = string.find(s, "l+")
        local parts = string.split("a,b,,c", ",")
        local t = table.move({1, 2, 3}, 1, 3, 2)
        local ok, err = pcall(error, "boom")
        local ok2, v = pcall(function(x) return x * 2 end, 21)
        local ok3, h = xpcall(function() error("x") end, function(m) return "handled" end)
        return {a = a, b = b, c = c, d = d, e = e, n = #parts, third = parts[3], moved = t,
                ok = ok, err = err, v = v, h = h, neg = string.find(s, "hello", -5, true),
                empty = string.find(s, "", 3, true), past = string.find(s, "h", 100, true) == nil}
    end"#);
    let d = serde_json::Value::Object(map_one(&a, json!({})).result.expect("ok")[0].1.clone());
    assert_eq!(
        d,
        json!({"a": 14, "b": 18, "c": 5, "d": 7, "e": 3, "n": 4, "third": "", "moved": [1, 1, 2, 3],
               "ok": false, "err": "boom", "v": 42, "h": "handled", "neg": 14, "empty": 3, "past": true})
    );
}

#[test]
fn host_helpers_are_bounded() {
    // A 1 MB message logged a million times: only what is kept is copied.
    let out = attack_map(
        "log",
        r#"function map(r) local s = string.rep("x", 1e6) while true do log(s) end end"#,
        json!({}),
    );
    assert_limit("log", &out, "limit");
    assert!(out.log.is_some_and(|l| l.len() <= 1024));
    // parse_json builds its result in the VM, under the memory limit.
    let out = attack_map(
        "parse_json",
        r#"function map(r) return {n = #parse_json("[" .. string.rep("[0,0,0,0],", 4e5) .. "0]")} end"#,
        json!({}),
    );
    assert_limit("parse_json", &out, "memory limit");
    let out = attack_map(
        "parse_csv",
        r#"function map(r) return {n = #parse_csv("a,b\n" .. string.rep("1,2\n", 1e6))} end"#,
        json!({}),
    );
    assert_limit("parse_csv", &out, "limit");
    let a = app(
        r#"function map(r) local v = parse_json('{"a": [1, 2.5, null, "x"], "b": {}}')
        return {a = v.a, b = v.b} end"#,
    );
    let d = serde_json::Value::Object(map_one(&a, json!({})).result.expect("ok")[0].1.clone());
    assert_eq!(d, json!({"a": [1, 2.5, null, "x"], "b": {}}));
    let f = map_one(
        &app("function map(r) return parse_json('{') end"),
        json!({}),
    )
    .result
    .expect_err("bad json");
    assert!(f.reason.contains("parse_json: EOF"), "{}", f.reason);
    assert!(!f.limit);
}

#[test]
fn expensive_builtins_are_bounded() {
    for (what, src, reason) in [
        (
            "string.rep",
            "function map(r) return {s = string.rep('x', 2^29)} end",
            "memory limit",
        ),
        (
            "table.create",
            "function map(r) return {t = table.create(1e7, 1)} end",
            "memory limit",
        ),
        (
            "buffer.create",
            "function map(r) return {b = buffer.create(2^29)} end",
            "memory limit",
        ),
        (
            "table.concat",
            "function map(r) local t = table.create(1e6, string.rep('x', 100)) return {s = table.concat(t)} end",
            "memory limit",
        ),
        (
            "table.sort with a looping comparator",
            "function map(r) local t = {3, 2, 1} table.sort(t, function(a, b) while true do end end) end",
            "time limit",
        ),
        (
            "table.insert at the front",
            "function map(r) local t = table.create(1e5, 1) while true do table.insert(t, 1, 0) table.remove(t, 1) end end",
            "time limit",
        ),
        (
            "utf8 over a long string",
            "function map(r) local s = string.rep('é', 1e6) while true do utf8.len(s) end end",
            "time limit",
        ),
        (
            "string.format",
            "function map(r) local s = string.rep('x', 1e6) while true do string.format('%s%s%q', s, s, s) end end",
            "limit",
        ),
    ] {
        let out = attack_map(what, src, json!({}));
        assert_limit(what, &out, reason);
    }
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

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                any::<char>(),
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\u{1}'),
                Just('\u{7f}'),
                Just('é'),
            ],
            0..10,
        )
        .prop_map(String::from_iter)
    }

    fn document() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite fractional", |f| f.is_finite() && f.fract() != 0.0)
                .prop_map(Value::from),
            text().prop_map(Value::String),
        ];
        let tree = leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_\"\\\\\n\u{1}é][a-z0-9]{0,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop::collection::btree_map("[a-z]{1,6}", tree, 0..6)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn naive_find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
        if from > hay.len() {
            return None;
        }
        (from..=hay.len().saturating_sub(needle.len()))
            .find(|&i| hay.len() >= i + needle.len() && &hay[i..i + needle.len()] == needle)
    }

    proptest! {
        #[test]
        fn documents_are_metered_at_their_exact_json_size(doc in document()) {
            let lua = mlua::Lua::new();
            let l = json_to_lua(&lua, &doc).expect("to lua");
            let mut meter = super::super::Meter::unlimited();
            let back = lua_to_json(&lua, &l, 0, &mut meter).expect("from lua");
            prop_assert_eq!(meter.document_bytes(), serde_json::to_vec(&back).expect("json").len());
            prop_assert_eq!(&back, &doc);
            // One byte less and the same document is refused, before it is complete.
            let size = meter.document_bytes();
            let mut tight = super::super::Meter::new(size - 1, usize::MAX, usize::MAX);
            prop_assert!(matches!(
                lua_to_json(&lua, &l, 0, &mut tight),
                Err(super::super::ConvertError::Limit(super::super::Exceeded::Document))
            ));
        }

        #[test]
        fn parse_json_builds_what_serde_reads(doc in document()) {
            let lua = mlua::Lua::new();
            let text = serde_json::to_vec(&doc).expect("json");
            let l = super::super::convert::json_text_to_lua(&lua, &text, &|| Ok(())).expect("parsed");
            let back = lua_to_json(&lua, &l, 0, &mut super::super::Meter::unlimited()).expect("from lua");
            prop_assert_eq!(back, doc);
        }

        #[test]
        fn find_bytes_finds_what_a_naive_search_finds(
            hay in prop::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..200),
            needle in prop::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..24),
            from in 0usize..210,
        ) {
            prop_assert_eq!(
                super::super::find_bytes(&hay, &needle, from),
                naive_find(&hay, &needle, from)
            );
        }

        #[test]
        fn the_linear_plain_find_answers_as_luau_does(
            hay in prop::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..40),
            needle in prop::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..6),
            init in -50i64..50,
        ) {
            let lua = mlua::Lua::new();
            let find: mlua::Function = lua.load("return string.find").eval().expect("find");
            let (start, end): (Option<i64>, Option<i64>) = find
                .call((lua.create_string(&hay).expect("s"), lua.create_string(&needle).expect("p"), init, true))
                .expect("luau finds");
            prop_assert_eq!(
                super::super::builtins::find_plain(&hay, &needle, init),
                start.zip(end)
            );
        }

        #[test]
        fn json_survives_the_trip_through_luau(v in json()) {
            let lua = mlua::Lua::new();
            let l = json_to_lua(&lua, &v).expect("to lua");
            let back = lua_to_json(&lua, &l, 0, &mut super::super::Meter::unlimited()).expect("from lua");
            prop_assert_eq!(back, v);
        }

        #[test]
        fn any_number_converts_by_the_documented_rules(n in any::<f64>()) {
            let lua = mlua::Lua::new();
            let r = lua_to_json(&lua, &mlua::Value::Number(n), 0, &mut super::super::Meter::unlimited());
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

#[test]
fn the_time_limit_counts_cpu_time_not_time_spent_waiting_for_a_core() {
    let limits = AppLimits {
        time_ms: 50,
        ..AppLimits::default()
    };
    let budget = super::budget::Budget::new(&limits);
    // Descheduled (here: asleep) past the limit: no CPU used, so the call goes on.
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert!(budget.check().is_ok(), "waiting is not running");
    // Running past it fails.
    let start = std::time::Instant::now();
    let mut stopped = false;
    while start.elapsed() < std::time::Duration::from_secs(2) {
        if budget.check().is_err() {
            stopped = true;
            break;
        }
        std::hint::black_box((0..1000).sum::<u64>());
    }
    assert!(stopped, "50 ms of CPU ends the call");
    let ran = start.elapsed();
    assert!(
        ran >= std::time::Duration::from_millis(45),
        "stopped after {ran:?}"
    );
    assert_eq!(budget.hit(), super::budget::Limit::Time);
}

#[test]
fn a_call_that_stops_using_cpu_ends_at_the_wall_clock_backstop() {
    let limits = AppLimits {
        time_ms: 10,
        ..AppLimits::default()
    };
    let budget = super::budget::Budget::new(&limits);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(budget.check().is_err(), "1 s of wall time is the backstop");
}
