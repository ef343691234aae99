// What a person sees in the lungate scan report, collected from the page
// as Chromium rendered it (tests/report_browser.rs judges it). Only
// rendered things count: an element must have a box and be visible, and
// texts are innerText (what is drawn, after CSS), not markup.
(() => {
  const visible = (e) => {
    if (!e) return false;
    const r = e.getBoundingClientRect();
    const s = getComputedStyle(e);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && Number(s.opacity) > 0;
  };
  const text = (e) => (e ? e.innerText.replace(/\s+/g, ' ').trim() : '');
  const width = document.documentElement.clientWidth;
  const overflow = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && (r.right > width + 0.5 || r.left < -0.5)) {
      overflow.push(`${e.tagName.toLowerCase()}.${e.className} [${Math.round(r.left)}, ${Math.round(r.right)}]: ${text(e).slice(0, 60)}`);
    }
  }
  const rows = (sel) => [...document.querySelectorAll(sel)].map((r) => ({
    path: r.dataset.path || null, text: text(r), visible: visible(r),
  }));
  return JSON.stringify({
    title: document.title,
    viewport: window.innerWidth,
    width,
    scroll_width: document.documentElement.scrollWidth,
    overflow: overflow.slice(0, 20),
    summary: text(document.getElementById('summary')),
    list: [...document.querySelectorAll('#vm-list tbody tr')].map((r) => ({
      vm: r.dataset.vm, text: text(r), visible: visible(r),
      link_ok: !!(r.querySelector('a[href^="#"]') && document.getElementById(r.querySelector('a[href^="#"]').getAttribute('href').slice(1))),
    })),
    vms: [...document.querySelectorAll('section.vm')].map((s) => ({
      name: s.dataset.vm, parent: s.dataset.parent || null, id: s.id, visible: visible(s),
      heading: text(s.querySelector('h2')),
      parent_link_ok: (() => {
        const a = s.querySelector('h2 .badge a[href^="#"]');
        return a ? !!document.getElementById(a.getAttribute('href').slice(1)) : null;
      })(),
      disks: [...s.querySelectorAll('tr.disk')].map((r) => ({ disk: r.dataset.disk, text: text(r), visible: visible(r) })),
      secondaries: [...s.querySelectorAll('tr.secondary')].map((r) => ({ name: r.dataset.secondary, text: text(r), visible: visible(r) })),
      warnings: [...s.querySelectorAll('.warnings li')].map(text),
    })),
    nodes: [...document.querySelectorAll('li.node')].map((n) => {
      const pill = n.querySelector(':scope > .pill');
      const up = n.parentElement.closest('li.node');
      const card = n.closest('section.vm');
      const a = pill && pill.querySelector('a[href^="#"]');
      return {
        kind: n.dataset.kind, owner: n.dataset.owner, name: n.dataset.name,
        card: card ? card.dataset.vm : null,
        under: up ? `${up.dataset.kind}:${up.dataset.name}` : null,
        text: text(pill), visible: visible(pill),
        width: pill ? Math.round(pill.getBoundingClientRect().width) : 0,
        height: pill ? Math.round(pill.getBoundingClientRect().height) : 0,
        link: a ? a.getAttribute('href') : null,
        link_ok: a ? !!document.getElementById(a.getAttribute('href').slice(1)) : null,
      };
    }),
    damaged: rows('#damaged tbody tr'),
    skipped: rows('#skipped tbody tr'),
  });
})()
