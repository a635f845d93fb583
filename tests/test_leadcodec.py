"""The embedded store's lead records: what is packed is what comes back, whatever it holds."""

from __future__ import annotations

import pickle

from hypothesis import given
from hypothesis import strategies as st

from wecomctl.store import leadcodec
from wecomctl.store.base import STAGES

values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                   st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
stage_records = st.dictionaries(st.sampled_from(leadcodec.STAGE_KEYS + ("msgid", "lookups")), values)
leads = st.fixed_dictionaries({}, optional={
    **{k: values for k in leadcodec.LEAD_KEYS},
    **{s: st.one_of(st.none(), stage_records) for s in STAGES},
    "welcome_status": values, "welcome_text": values,
})


@given(leads)
def test_every_lead_comes_back_as_it_was_packed(lead):
    # Missing keys stay missing (not None), keys the codec does not list are kept.
    assert leadcodec.unpack(leadcodec.pack(lead)) == lead


def test_a_new_lead_packs_as_the_dict_it_stands_for():
    values = (7, "spring", "+8613800138000", "王伟", "zhangsan", {"城市": "北京"}, "a.csv", 3, 1.5, None)
    add = leadcodec.new_stage("ready", "ready:add:9", 1.5)
    lead = dict(zip(leadcodec.LEAD_KEYS, values), add=dict(zip(leadcodec.STAGE_KEYS, add)))
    assert leadcodec.unpack(leadcodec.pack_new(values, add)) == lead
    assert leadcodec.pack_new(values, add) == leadcodec.pack(lead)


def test_records_of_the_older_format_are_read_as_written():
    lead = {"id": 1, "campaign": "c", "phone": "+8613800138000", "add": {"state": "done"}, "x": [1]}
    assert leadcodec.unpack(pickle.dumps(lead)) == lead


def test_a_packed_lead_is_much_smaller_than_a_pickled_dict():
    values = (1, "spring", "+8613800138000", "客户0", "wangwu", {"手机号码": "13800138000", "城市": "北京"},
              "leads.csv", 1, 1796360928.2, None)
    add = leadcodec.new_stage("ready", "ready:add:1", 1796360928.2)
    lead = dict(zip(leadcodec.LEAD_KEYS, values), add=dict(zip(leadcodec.STAGE_KEYS, add)))
    assert len(leadcodec.pack(lead)) < 0.7 * len(pickle.dumps(lead, pickle.HIGHEST_PROTOCOL))
