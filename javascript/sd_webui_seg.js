// Smoothed Energy Guidance: show the hires-pass scale and sigma only when that pass is "custom",
// and mark a sigma the blur cannot use before the user generates.
(function() {
    "use strict";

    const TABS = ["txt2img", "img2img"];
    const PREFIX = "smoothed_energy_guidance";

    function segHiresFieldsVisible(mode) {
        return mode === "custom";
    }

    function segSigmaProblem(text) {
        const value = String(text).trim().toLowerCase();
        if (["inf", "+inf", "infinity", "∞", "-1"].includes(value)) return "";
        const number = Number(value);
        if (value === "" || Number.isNaN(number)) return "σ must be a number ≥ 0, or inf";
        if (number < 0) return "negative σ is taken as inf";
        if (number <= 1 / 6) return "σ ≤ 1/6 blurs nothing: SEG will be off";
        return "";
    }

    function byId(tab, item) {
        return gradioApp().querySelector(`#script_${tab}_${PREFIX}_${item}`);
    }

    function syncHires(tab) {
        const radio = byId(tab, "hires");
        const checked = radio && radio.querySelector("input:checked");
        const visible = segHiresFieldsVisible(checked ? checked.value : "same");
        for (const item of ["hires_scale", "hires_sigma"]) {
            const field = byId(tab, item);
            if (field) field.style.display = visible ? "" : "none";
        }
    }

    function checkSigma(tab, item) {
        const field = byId(tab, item);
        const input = field && field.querySelector("input");
        if (input) input.title = segSigmaProblem(input.value);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(function() {
            for (const tab of TABS) {
                const radio = byId(tab, "hires");
                if (radio) radio.addEventListener("change", () => syncHires(tab));
                for (const item of ["sigma", "hires_sigma"]) {
                    const field = byId(tab, item);
                    if (field) field.addEventListener("input", () => checkSigma(tab, item));
                }
                syncHires(tab);
            }
        });
        // pasted infotext changes the radio without a change event
        onUiUpdate(function() {
            for (const tab of TABS) syncHires(tab);
        });
    }

    if (typeof module !== "undefined") {
        module.exports = {segHiresFieldsVisible, segSigmaProblem};
    }
})();
